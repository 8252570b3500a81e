; detect_both: CPUID and probing side by side. For each feature it prints what CPUID
; says and what executing one instruction under a #UD handler finds, and uses the
; CPUID verdict, as the vendors require. Under an EVC mask the two disagree: on a
; Nehalem host in an intel-penryn cluster, "popcnt: cpuid=0 probe=1" shows a hidden
; feature that still executes; on a real Penryn it is "popcnt: cpuid=0 probe=0".
start:
    call setup_ud_handler
    mov r15d, 2                 ; policy 2: probe, but trust CPUID
    call detect_all
    xor eax, eax
    jmp power_off

.include "lib/detect.inc"
