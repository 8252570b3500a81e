; avx_proper: the complete AVX check next to the naive one. CPUID.1:ECX.AVX says the
; CPU has AVX; it does not say the OS saves YMM registers. The complete check also
; needs CPUID.1:ECX.OSXSAVE and XGETBV showing XCR0[2:1] = 11b (Intel SDM Vol. 1,
; 14.3 "Detection of Intel AVX instructions"). On a Sandy Bridge whose OS enabled only
; x87|SSE state, the naive check says "avx" and its VADDPS raises #UD; the complete
; check says "sse2". It prints both verdicts, what the naive path's VADDPS did, and a
; SPEC detection line whose path is the complete check's verdict.
start:
    call setup_ud_handler
    mov eax, 1
    cpuid
    bt ecx, 28                              ; CPUID.1:ECX.AVX
    setc r12b
    bt ecx, 27                              ; CPUID.1:ECX.OSXSAVE
    setc r13b
    xor r14d, r14d                          ; XCR0, 0 when XGETBV itself would #UD
    test r13b, r13b
    jz verdicts
    xor ecx, ecx
    xgetbv
    mov r14d, eax
verdicts:
    lea rsi, [rip + s_avx]
    call print_str
    mov al, r12b
    call print_bit
    lea rsi, [rip + s_osxsave]
    call print_str
    mov al, r13b
    call print_bit
    lea rsi, [rip + s_xcr0]
    call print_str
    mov eax, r14d
    call print_hex32
    lea rsi, [rip + s_naive]                ; naive: the AVX bit alone
    call print_str
    mov al, r12b
    call print_path
    mov ebx, r14d                           ; complete: AVX, OSXSAVE and XCR0[2:1] = 11b
    and ebx, 6
    cmp ebx, 6
    sete bl
    and bl, r12b
    and bl, r13b
    mov r15b, bl
    lea rsi, [rip + s_proper]
    call print_str
    mov al, r15b
    call print_path
    mov bl, 2                               ; probe result: 2 = not probed
    test r12b, r12b
    jz detection
    lea rsi, [rip + s_naive_ran]            ; the naive path runs VADDPS
    call print_str
    push rbx
    lea rbx, [rip + p_vaddps]
    call probe_call
    pop rbx
    mov bl, al
    lea rsi, [rip + s_ran]
    test al, al
    jnz naive_result
    lea rsi, [rip + s_ud]
naive_result:
    call print_str
detection:
    lea rsi, [rip + s_line]                 ; "avx: cpuid=C probe=P uses=PATH"
    call print_str
    mov al, r12b
    call print_bit
    lea rsi, [rip + s_probe]
    call print_str
    mov al, 0x2d                            ; '-'
    cmp bl, 2
    je detection_probe
    mov al, bl
    add al, 0x30
detection_probe:
    call print_char
    lea rsi, [rip + s_uses]
    call print_str
    lea rsi, [rip + s_sse2]
    test r15b, r15b
    jz detection_path
    lea rsi, [rip + s_avx_name]
detection_path:
    call print_str
    mov al, 10
    call print_char
    xor eax, eax
    jmp power_off

; print_bit: print AL (0 or 1) as a digit.
print_bit:
    add al, 0x30
    jmp print_char

; print_path: print "avx\n" if AL, else "sse2\n".
print_path:
    lea rsi, [rip + s_sse2]
    test al, al
    jz print_path_out
    lea rsi, [rip + s_avx_name]
print_path_out:
    call print_str
    mov al, 10
    jmp print_char

p_vaddps:
    vaddps ymm0, ymm1, ymm2                 ; AVX: #UD unless XCR0[2:1] = 11b
    ret

s_avx:       .asciz "cpuid avx="
s_osxsave:   .asciz " osxsave="
s_xcr0:      .asciz " xcr0=0x"
s_naive:     .asciz "\nnaive check (avx bit only): "
s_proper:    .asciz "complete check (avx, osxsave, xcr0 ymm): "
s_naive_ran: .asciz "naive path's vaddps: "
s_ran:       .asciz "ran\n"
s_ud:        .asciz "#UD\n"
s_line:      .asciz "avx: cpuid="
s_probe:     .asciz " probe="
s_uses:      .asciz " uses="
s_avx_name:  .asciz "avx"
s_sse2:      .asciz "sse2"

.include "lib/idt.inc"
.include "lib/console.inc"
