; hello: the smallest guest. It prints one line on the debug console (port 0xE9)
; and powers off with status 0 (port 0xF4). Try: minivmm run hello --host penryn
start:
    lea rsi, [rip + greeting]
    call print_str
    xor eax, eax
    jmp power_off

greeting: .asciz "Hello from a minivmm guest!\n"

.include "lib/console.inc"
