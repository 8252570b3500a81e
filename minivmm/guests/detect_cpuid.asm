; detect_cpuid: CPUID-guided feature detection, the way Intel and AMD tell software
; to do it. For each feature it asks CPUID (checking the maximum leaf first) and
; prints "FEATURE: cpuid=0|1 probe=- uses=PATH": it never executes an instruction
; it was not told about, so it stays correct when a CPUID mask hides a feature and
; when the VM migrates to a host that lacks it.
start:
    xor eax, eax
    cpuid
    mov r13d, eax               ; r13: maximum basic leaf
    lea rbx, [rip + features]
next_feature:
    mov rsi, [rbx]              ; feature name, 0 ends the table
    test rsi, rsi
    jz finished
    xor r14d, r14d              ; r14: detected?
    mov eax, [rbx + 8]          ; leaf
    cmp eax, r13d
    ja report                   ; leaf beyond the maximum: not there
    mov ecx, [rbx + 12]         ; subleaf
    push rbx
    cpuid
    mov r8d, eax
    mov r9d, ebx
    mov r10d, ecx
    mov r11d, edx
    pop rbx
    mov eax, [rbx + 16]         ; register: 0 eax, 1 ebx, 2 ecx, 3 edx
    mov edx, r8d
    cmp eax, 1
    cmove edx, r9d
    cmp eax, 2
    cmove edx, r10d
    cmp eax, 3
    cmove edx, r11d
    mov ecx, [rbx + 20]         ; bit
    bt edx, ecx
    setc r14b
report:
    call print_str
    lea rsi, [rip + cpuid_is]
    call print_str
    mov al, 0x30
    add al, r14b
    call print_char
    lea rsi, [rip + uses]
    call print_str
    mov rsi, [rbx]
    test r14d, r14d
    jnz print_path
    lea rsi, [rip + generic]
print_path:
    call print_str
    mov al, 10
    call print_char
    add rbx, 24
    jmp next_feature
finished:
    xor eax, eax
    jmp power_off

cpuid_is: .asciz ": cpuid="
uses:     .asciz " probe=- uses="
generic:  .asciz "generic"

n_sse4_1:    .asciz "sse4_1"
n_sse4_2:    .asciz "sse4_2"
n_popcnt:    .asciz "popcnt"
n_aes:       .asciz "aes"
n_pclmulqdq: .asciz "pclmulqdq"
n_movbe:     .asciz "movbe"
n_bmi1:      .asciz "bmi1"
n_avx:       .asciz "avx"
n_avx2:      .asciz "avx2"

.align 8
; name, leaf, subleaf, register, bit (Intel SDM Vol. 2A, CPUID feature flags)
features:
    .quad n_sse4_1
    .long 1, 0, 2, 19
    .quad n_sse4_2
    .long 1, 0, 2, 20
    .quad n_popcnt
    .long 1, 0, 2, 23
    .quad n_aes
    .long 1, 0, 2, 25
    .quad n_pclmulqdq
    .long 1, 0, 2, 1
    .quad n_movbe
    .long 1, 0, 2, 22
    .quad n_bmi1
    .long 7, 0, 1, 3
    .quad n_avx
    .long 1, 0, 2, 28
    .quad n_avx2
    .long 7, 0, 1, 5
    .quad 0

.include "lib/console.inc"
