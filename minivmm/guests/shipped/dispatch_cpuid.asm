; dispatch_cpuid: detects SSE4.1 once at boot by asking CPUID, then runs a long
; checksum loop with PMULLD/PEXTRD when CPUID said yes and an SSE2 path otherwise,
; writing a checkpoint halfway. Because it follows CPUID, it is safe under EVC: in an
; intel-merom cluster it takes the SSE2 path even on a Penryn, and still finishes
; correctly after a live migration to a Core 2. Both paths print the same checksum.
start:
    mov eax, 1
    cpuid
    bt ecx, 19                              ; CPUID.1:ECX.SSE4_1
    setc al
    movzx r15d, al
    mov r14b, al
    mov r13b, 0x2d                          ; '-': not probed
    jmp run_checksum

.include "lib/dispatch.inc"
