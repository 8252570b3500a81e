; detect_cpuid: CPUID-guided feature detection, the way Intel and AMD tell software
; to do it. For each feature it asks CPUID (checking the maximum leaf first) and
; prints "FEATURE: cpuid=0|1 probe=- uses=PATH": it never executes an instruction
; it was not told about, so it stays correct when a CPUID mask hides a feature and
; when the VM migrates to a host that lacks it.
start:
    xor r15d, r15d              ; policy 0: CPUID only
    call detect_all
    xor eax, eax
    jmp power_off

.include "lib/detect.inc"
