; dirty_loop: writes one quadword on each of 4096 pages (a 16 MiB working set from
; 2 MiB up) round after round, forever, after a checkpoint at the start. It is the
; guest pre-copy cannot finish early: each round of a live migration finds the whole
; working set dirty again. It never ends: give it a --timeout, e.g.
; minivmm run dirty_loop --migrate westmere@checkpoint:1 --timeout 2
; minivmm: memory 64M
start:
    out 0xf5, al
again:
    mov rdi, 0x200000
    mov rcx, 4096
touch:
    add qword ptr [rdi], 1
    add rdi, 4096
    dec rcx
    jnz touch
    jmp again
