; cpuid_dump: prints every basic and extended CPUID leaf it reads (subleaf 0), in
; the line format of `cpuid -1 -r`, so the guest's view can be diffed with a real
; CPU's dump. The guest asks leaf 0 and 0x80000000 for the ranges first, as the
; vendors' manuals require.
start:
    xor r12d, r12d              ; r12: current leaf
    xor eax, eax
    cpuid
    mov r13d, eax               ; r13: last basic leaf
    call dump_range
    mov eax, 0x80000000
    cpuid
    mov r13d, eax               ; last extended leaf
    mov r12d, 0x80000000
    cmp r13d, r12d
    jb finished                 ; no extended leaves
    call dump_range
finished:
    xor eax, eax
    jmp power_off

; dump_range: print leaves r12 .. r13 and leave r12 = r13 + 1.
dump_range:
    lea rsi, [rip + prefix]
    call print_str
    mov eax, r12d
    call print_hex32
    lea rsi, [rip + subleaf0]
    call print_str
    mov eax, r12d
    xor ecx, ecx
    cpuid
    mov [rip + regs], eax
    mov [rip + regs + 4], ebx
    mov [rip + regs + 8], ecx
    mov [rip + regs + 12], edx
    xor ebx, ebx                ; register index 0..3
print_reg:
    lea rsi, [rip + reg_names]
    lea rsi, [rsi + rbx * 8]
    call print_str
    lea rsi, [rip + regs]
    mov eax, [rsi + rbx * 4]
    call print_hex32
    inc ebx
    cmp ebx, 4
    jb print_reg
    mov al, 10
    call print_char
    inc r12d
    cmp r12d, r13d
    jbe dump_range
    ret

prefix:   .asciz "   0x"
subleaf0: .asciz " 0x00:"
reg_names:                      ; 8 bytes each
    .asciz " eax=0x"
    .asciz " ebx=0x"
    .asciz " ecx=0x"
    .asciz " edx=0x"
.align 4
regs: .fill 16, 1, 0

.include "lib/console.inc"
