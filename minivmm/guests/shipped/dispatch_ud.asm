; dispatch_ud: the same checksum loop, but SSE4.1 is detected by executing PTEST under
; a #UD handler. EVC's mask does not stop PTEST from running on a Penryn, so this guest
; takes the SSE4.1 path even in an intel-merom cluster, and when the VM is migrated
; mid-loop to a Core 2, which really lacks SSE4.1, its next PMULLD raises #UD: the
; handler is gone by then, and the run crashes naming sse4_1.
start:
    call setup_ud_handler
    lea rbx, [rip + probe_ptest]
    call probe_call
    movzx r15d, al
    lea r13d, [eax + 0x30]                  ; the probe's verdict, as a character
    call remove_ud_handler
    mov eax, 1                              ; CPUID only for the report: the path follows the probe
    cpuid
    bt ecx, 19
    setc r14b
    jmp run_checksum

probe_ptest:
    ptest xmm0, xmm0                        ; SSE4.1
    ret

.include "lib/dispatch.inc"
