/* crt0.S: entry, the IDT gate for #UD, and probing, for minivmm's C guests. */
    .intel_syntax noprefix
    .text
    .globl _start
_start:
    and rsp, -16                    /* the SysV ABI: 16-byte aligned before a call */
    call main
    mov edx, 0xf4
    out dx, al                      /* power off with main's return value */
    hlt

/* The #UD gate (vector 6): call the C handler with the frame, then iretq. */
    .globl minivmm_ud_entry
minivmm_ud_entry:
    push rbx
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    lea rdi, [rsp + 80]             /* the CPU's frame, above the ten saved registers */
    mov rbx, rsp                    /* rbx is callee-saved: it survives the call */
    and rsp, -16
    call minivmm_ud_dispatch
    mov rsp, rbx
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    pop rbx
    iretq

/* int minivmm_probe_call(void (*fn)(void)): a #UD inside fn resumes at probe_failed with
 * the stack as it was at the fault: fn's return address on top, so ret leaves fn. */
    .globl minivmm_probe_call
minivmm_probe_call:
    push rbx
    mov byte ptr [rip + minivmm_probing], 1
    mov byte ptr [rip + minivmm_probe_ud], 0
    call rdi
    mov byte ptr [rip + minivmm_probing], 0
    mov eax, 1
    movzx ebx, byte ptr [rip + minivmm_probe_ud]
    sub eax, ebx
    pop rbx
    ret

    .globl minivmm_probe_failed
minivmm_probe_failed:
    ret

    .data
    .globl minivmm_probing, minivmm_probe_ud
minivmm_probing: .byte 0
minivmm_probe_ud: .byte 0
    .section .note.GNU-stack, "", @progbits
