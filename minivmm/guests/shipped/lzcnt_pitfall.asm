; lzcnt_pitfall: uses LZCNT without asking CPUID for abm. On a host with ABM
; (Haswell, Opteron G3 and later) lzcnt(1) is 31. On a host without it (Penryn,
; Nehalem ...) the same bytes execute as BSR, the REP prefix ignored, and give 0:
; no fault, just a silently wrong answer. The exit status is the result.
start:
    mov ebx, 1
    lzcnt eax, ebx
    mov r12d, eax
    lea rsi, [rip + message]
    call print_str
    mov eax, r12d
    call print_hex32
    mov al, 10
    call print_char
    mov eax, r12d
    jmp power_off

message: .asciz "lzcnt(1) = 0x"

.include "lib/console.inc"
