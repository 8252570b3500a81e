; detect_ud: #UD-guided detection, the pitfall EVC cannot prevent. For each feature it
; executes one instruction under a #UD handler and uses whatever did not fault
; ("FEATURE: cpuid=0|1 probe=0|1 uses=PATH", where the path follows the probe; the
; CPUID bit is printed for comparison only). A CPUID mask hides a feature but does not
; disable it, so this guest finds masked features, uses them, and breaks after a
; migration to a host that really lacks them. On a host with AVX the engine cannot run
; the avx probe: the run ends as "unsupported" there, after the other lines.
start:
    call setup_ud_handler
    mov r15d, 1                 ; policy 1: trust the probe
    call detect_all
    xor eax, eax
    jmp power_off

.include "lib/detect.inc"
