; detect_extended: detect_both for features of the extended leaf 0x80000001 (AMD's
; SSE4a, and LAHF/SAHF in 64-bit mode): CPUID and probing side by side. Masked with
; --cpuid-mask=-sse4a on a CPU that has SSE4a, "sse4a: cpuid=0 probe=1": the hidden
; feature still executes, on the emulator's native profile as on the machine itself
; under --accel kvm.
start:
    call setup_ud_handler
    mov r15d, 2                 ; policy 2: probe, but trust CPUID
    lea rbx, [rip + extended_features]
    call detect_table
    xor eax, eax
    jmp power_off

n_sse4a:     .asciz "sse4a"
n_lahf_lm:   .asciz "lahf_lm"
p_sse4a:     .byte 0x66, 0x0f, 0x78, 0xc0, 0x08, 0x00   ; extrq xmm0, 8, 0 (keystone lacks SSE4a)
             ret
p_lahf_lm:   lahf
             ret

.align 8
; name, leaf, subleaf, register, bit (AMD APM Vol. 3, CPUID Fn8000_0001_ECX), probe
extended_features:
    .quad n_sse4a
    .long 0x80000001, 0, 2, 6
    .quad p_sse4a
    .quad n_lahf_lm
    .long 0x80000001, 0, 2, 0
    .quad p_lahf_lm
    .quad 0

.include "lib/detect.inc"
