"""The hardware view of a mask: Intel FlexMigration and AMD Extended Migration MSRs.

Before CPUID faulting and CPUID-exiting hypervisors, a mask lived in model-specific
registers that the CPU consulted when answering CPUID. Which exist, and what they can
express, depends on the CPU (the probing of Xen's ``arch/x86/cpu/{intel,amd}.c``):

* Intel, family 6: Penryn (models 0x17, 0x1d) has 0x478 for leaf 1 ECX/EDX;
  Nehalem/Westmere 0x130/0x131 for leaf 1 and 0x80000001; Sandy Bridge (0x2a, 0x2d)
  0x132/0x133 and 0x134 for leaf 0xD subleaf 1 EAX. The value is an AND mask
  (EDX in the high half, ECX in the low): hardware can hide a bit, never show one.
* AMD (every family but 0x11): C001_1004 for leaf 1, C001_1005 for 0x80000001 (ECX in
  the high half, EDX in the low), and C001_1002 for leaf 7 subleaf 0 (EAX high, EBX
  low) where leaf 7 exists. The value *replaces* what CPUID reports, so it can show a
  bit too (which is why Xen ANDs it with the real CPUID first).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cpu.features import REGISTERS
from .mask import Mask, _bit_name, _bits


@dataclass(frozen=True)
class MaskingMsr:
    index: int
    name: str
    leaf: int
    subleaf: int
    high: str | None     # register in bits 63:32
    low: str             # register in bits 31:0

    @property
    def registers(self) -> tuple[str, ...]:
        return tuple(r for r in (self.high, self.low) if r)


INTEL_V1 = (MaskingMsr(0x478, "MSR_INTEL_MASK_V1_CPUID1", 1, 0, "edx", "ecx"),)
INTEL_V2 = (MaskingMsr(0x130, "MSR_INTEL_MASK_V2_CPUID1", 1, 0, "edx", "ecx"),
            MaskingMsr(0x131, "MSR_INTEL_MASK_V2_CPUID80000001", 0x80000001, 0, "edx", "ecx"))
INTEL_V3 = (MaskingMsr(0x132, "MSR_INTEL_MASK_V3_CPUID1", 1, 0, "edx", "ecx"),
            MaskingMsr(0x133, "MSR_INTEL_MASK_V3_CPUID80000001", 0x80000001, 0, "edx", "ecx"),
            MaskingMsr(0x134, "MSR_INTEL_MASK_V3_CPUIDD_01", 0xD, 1, None, "eax"))
AMD_BASE = (MaskingMsr(0xC0011004, "MSR_K8_FEATURE_MASK", 1, 0, "ecx", "edx"),
            MaskingMsr(0xC0011005, "MSR_K8_EXT_FEATURE_MASK", 0x80000001, 0, "ecx", "edx"))
AMD_LEAF7 = MaskingMsr(0xC0011002, "MSR_AMD_L7S0_FEATURE_MASK", 7, 0, "eax", "ebx")

INTEL_MODELS = {0x17: INTEL_V1, 0x1D: INTEL_V1,
                **dict.fromkeys((0x1A, 0x1E, 0x1F, 0x25, 0x2C, 0x2E, 0x2F), INTEL_V2),
                0x2A: INTEL_V3, 0x2D: INTEL_V3}


def masking_msrs(profile) -> tuple[MaskingMsr, ...]:
    sig = profile.signature
    if profile.vendor == "intel":
        return INTEL_MODELS.get(sig.model, ()) if sig.family == 6 else ()
    if profile.vendor in ("amd", "hygon") and sig.family != 0x11:
        return AMD_BASE + ((AMD_LEAF7,) if profile.cpuid.max_basic >= 7 else ())
    return ()


@dataclass
class MsrView:
    host: str
    replaces: bool                       # AMD: the MSR value is what CPUID reports
    values: list[tuple[MaskingMsr, int]]
    unmaskable: list[str]                # bits this hardware cannot express

    def to_dict(self) -> dict:
        return {"host": self.host, "semantics": "override" if self.replaces else "and-mask",
                "msrs": [{"msr": f"{m.index:#x}", "name": m.name, "value": f"{v:#018x}",
                          "leaf": m.leaf, "subleaf": m.subleaf} for m, v in self.values],
                "unmaskable": self.unmaskable}


def msr_view(mask: Mask, profile) -> MsrView:
    msrs = masking_msrs(profile)
    replaces = profile.vendor != "intel"
    covered = {(m.leaf, m.subleaf, r) for m in msrs for r in m.registers}
    unmaskable = []
    for (leaf, subleaf, reg), modifier in mask.registers.items():
        if not profile.cpuid.in_range(leaf):
            continue  # a leaf this CPU does not have needs no masking
        real = profile.cpuid.query(leaf, subleaf)[REGISTERS.index(reg)]
        changed = modifier.apply(real) ^ real  # only bits the mask changes on this host need hardware
        if (leaf, subleaf, reg) not in covered:
            unmaskable += [f"{_bit_name(leaf, subleaf, reg, b)}: no masking MSR for this leaf on {profile.name}"
                           for b in _bits(changed)]
        elif not replaces:
            unmaskable += [f"{_bit_name(leaf, subleaf, reg, b)}: an Intel mask can hide a bit, not show one"
                           for b in _bits(changed & modifier.value)]
    values = []
    for msr in msrs:
        real = profile.cpuid.query(msr.leaf, msr.subleaf)
        words = []
        for reg in (msr.high, msr.low):
            if reg is None:
                words.append(0)
                continue
            modifier = mask.registers.get((msr.leaf, msr.subleaf, reg))
            hidden = modifier.filter & ~modifier.value if modifier else 0
            if replaces:
                value = modifier.apply(real[REGISTERS.index(reg)]) if modifier else real[REGISTERS.index(reg)]
                words.append(value)
            else:
                words.append(0xFFFFFFFF & ~hidden)
        values.append((msr, words[0] << 32 | words[1]))
    if not msrs and unmaskable:
        unmaskable.insert(0, f"{profile.name} has no CPUID masking MSRs: the mask needs CPUID faulting "
                             f"or a CPUID-exiting hypervisor")
    return MsrView(profile.name, replaces, values, unmaskable)
