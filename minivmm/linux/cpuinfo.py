"""/proc/cpuinfo as Linux prints it (arch/x86/kernel/cpu/proc.c show_cpuinfo), made from
the VM's CPUID view: a program that reads it is never told something CPUID denies."""

from __future__ import annotations

from ..cpu.features import REGISTERS, catalogue

VENDORS = {"intel": "GenuineIntel", "amd": "AuthenticAMD"}


# The kernel's capability words (arch/x86/include/asm/cpufeatures.h): flags print word
# by word, bit by bit. (leaf, subleaf, register) -> word.
WORDS = {(1, 0, "edx"): 0, (0x80000001, 0, "edx"): 1, (1, 0, "ecx"): 4, (0x80000001, 0, "ecx"): 6,
         (7, 0, "ebx"): 9, (0xD, 1, "eax"): 10, (7, 1, "eax"): 12, (0x80000008, 0, "ebx"): 13, (6, 0, "eax"): 14,
         (0x8000000A, 0, "edx"): 15, (7, 0, "ecx"): 16, (0x80000007, 0, "ebx"): 17, (7, 0, "edx"): 18,
         (0x8000001F, 0, "eax"): 19, (0x80000021, 0, "eax"): 20}


# Flags the kernel names otherwise, or not at all (a "" name in cpufeatures.h; AMD's
# copies of leaf 1's EDX bits in 0x80000001, which word 1 leaves undefined).
RENAMED = {"turbo_boost": "ida"}
HIDDEN = frozenset(("zero_fcs_fds", "fdp_excptn_only"))
COPIES = "e_"
POWER = (0x80000007, 0, "edx")      # x86_power: the "power management" line, not flags
# ...but for the capabilities the kernel derives from it (early_init_intel/amd):
# invariant TSC -> constant_tsc and nonstop_tsc (word 3), core performance boost -> cpb (word 7).
DERIVED = {8: (("constant_tsc", 3, 8), ("nonstop_tsc", 3, 24)), 9: (("cpb", 7, 2),)}
# arch/x86/kernel/cpu/proc.c x86_power_flags; "" where the bit is a flag above
# init_amd: "3DNow or LM implies PREFETCHW": the kernel sets 3dnowprefetch itself on AMD.
AMD_IMPLIED = ("3dnowprefetch", ("lm", "3dnow"))
POWER_FLAGS = ("ts", "fid", "vid", "ttp", "tm", "stc", "100mhzsteps", "hwpstate", "", "cpb", "eff_freq_ro",
               "proc_feedback", "acc_power")


def _flags(view) -> list[str]:
    """Linux's names of the view's set bits, in the order the kernel prints them:
    capability word by word, then bit; bits of other leaves after, in CPUID order."""
    shown = [(WORDS.get((f.leaf, f.subleaf, f.register), 100), f.leaf, f.subleaf, REGISTERS.index(f.register), f.bit,
              RENAMED.get(f.name, f.name))
             for f in catalogue() if view.has(f) and (f.leaf, f.subleaf, f.register) != POWER and f.name not in HIDDEN
             and not f.name.startswith(COPIES)]
    implied, sources = AMD_IMPLIED
    if view.table.vendor == "amd" and any(view.has(catalogue()[name]) for name in sources):
        feature = catalogue()[implied]
        shown.append((WORDS[(feature.leaf, feature.subleaf, feature.register)], feature.leaf, feature.subleaf,
                      REGISTERS.index(feature.register), feature.bit, implied))
    power = _power(view)
    shown += [(word, 0, 0, 0, bit, name) for source, flags in DERIVED.items() if power >> source & 1
              for name, word, bit in flags]
    return [entry[-1] for entry in sorted(set(shown))]


def _power(view) -> int:
    return view.answer(0x80000007, 0, 0)[3] if view.table.in_range(0x80000007) else 0


def _power_line(view) -> str:
    """show_cpuinfo's power management flags: a name, nothing, or [bit]."""
    power = _power(view)
    names = (POWER_FLAGS[i] if i < len(POWER_FLAGS) else f"[{i}]" for i in range(32) if power >> i & 1)
    return "".join(f" {name}" for name in names if name)


def model_name(view) -> str:
    """The brand string of leaves 0x80000002-4, as the kernel keeps it (get_model_name:
    leading and trailing blanks trimmed, the ones inside kept), or "unknown" without one
    (show_cpuinfo)."""
    if not view.table.in_range(0x80000004):
        return "unknown"
    raw = b"".join(r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
                   for r in view.answer(leaf, 0, 0))
    return raw.split(b"\0", 1)[0].decode("latin-1").strip() or "unknown"


def cpuinfo(host, view) -> str:
    eax, ebx, _, _ = view.answer(1, 0, 0)
    base_family, base_model, stepping = eax >> 8 & 0xF, eax >> 4 & 0xF, eax & 0xF
    family = base_family + (eax >> 20 & 0xFF if base_family == 0xF else 0)
    model = base_model | ((eax >> 16 & 0xF) << 4 if base_family in (6, 0xF) else 0)
    sizes = view.answer(0x80000008, 0, 0)[0] if view.table.in_range(0x80000008) else 0
    physical, virtual = (sizes & 0xFF, sizes >> 8 & 0xFF) if sizes else (36, 48)
    clflush = (ebx >> 8 & 0xFF) * 8
    lines = [
        ("processor", "0"), ("vendor_id", VENDORS.get(host.vendor, host.vendor)), ("cpu family", str(family)),
        ("model", str(model)), ("model name", model_name(view)), ("stepping", str(stepping)),
        ("physical id", "0"), ("siblings", "1"), ("core id", "0"), ("cpu cores", "1"), ("apicid", "0"),
        ("initial apicid", "0"), ("fpu", "yes"), ("fpu_exception", "yes"),
        ("cpuid level", str(view.answer(0, 0, 0)[0])), ("wp", "yes"), ("flags", " ".join(_flags(view))),
        ("bugs", ""), ("clflush size", str(clflush)), ("cache_alignment", str(clflush)),
        ("address sizes", f"{physical} bits physical, {virtual} bits virtual"),
    ]
    # show_cpuinfo's names are followed by tabs to the second tab stop, then ": ".
    return "".join(f"{name}\t{'' if len(name) >= 8 else chr(9)}: {value}".rstrip(" ") + "\n"
                   for name, value in lines) + f"power management:{_power_line(view)}\n\n"
