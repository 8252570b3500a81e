"""Analyses of a mask: ``lint`` finds inconsistencies, ``explain`` says why each bit changed."""

from __future__ import annotations

from dataclasses import dataclass

from ..cpu.deps import hidden_closure, requirements, unmet
from ..cpu.features import REGISTERS, catalogue
from .formats import parse_mask
from .mask import Mask, _bit_name, _bits
from .view import GuestCpuidView

# Leaves only one vendor defines (Intel SDM Vol. 2A; AMD APM Vol. 3, Appendix E).
VENDOR_LEAVES = {
    "intel": {0x12: "SGX", 0x14: "Processor Trace", 0x1A: "hybrid core type", 0x1B: "PCONFIG", 0x1F: "V2 topology"},
    "amd": {0x8000000A: "SVM", 0x80000019: "TLB 1G", 0x8000001A: "performance hints", 0x8000001B: "IBS",
            0x8000001D: "cache topology", 0x8000001E: "extended APIC ID", 0x8000001F: "SEV",
            0x80000021: "extended feature 2"},
}
# Feature bits only one vendor's CPUs define.
VENDOR_FEATURES = {
    "amd": {"sse4a", "misalignsse", "3dnow", "3dnowext", "mmxext", "fxsr_opt", "xop", "fma4", "tbm", "svm",
            "lwp", "clzero", "mwaitx", "cr8_legacy", "extapic", "skinit", "ibs", "topoext"},
    "intel": {"vmx", "smx", "est", "tm2", "ds_cpl", "dtes64", "pdcm", "dca", "sgx", "pks"},
}


def lint(mask: Mask, host=None) -> list[str]:
    """Problems with a mask, alone or on a host: features shown without what they need,
    a maximum leaf clamped below leaves that still advertise features, and leaves or
    features of the other vendor."""
    problems = []
    shown, hidden = mask.features()
    closure = hidden_closure(hidden)
    for feature in sorted(shown & closure):
        needs = sorted(requirements().get(feature, frozenset()) & closure)
        problems.append(f"{feature} is shown but needs {', '.join(needs)}, which the mask hides")
    if host is None:
        return problems
    view = GuestCpuidView(host.cpuid, mask)
    visible = catalogue().decode(view.table)
    for feature, missing in sorted(unmet(visible).items()):
        if feature not in shown:  # already reported
            problems.append(f"on {host.name}, {feature} is shown without {', '.join(sorted(missing))}")
    for base in (0, 0x80000000):
        top = view.table.query(base)[0]
        beyond = sorted({f.name for f in catalogue() if base <= f.leaf < base + 0x10000000 and f.leaf > top
                         and f.is_set(view.masked.get((f.leaf, f.subleaf), (0, 0, 0, 0)))})
        if beyond and (base, 0, "eax") in mask.registers:
            problems.append(f"maximum leaf {top:#x} hides leaves that still advertise {', '.join(beyond)}")
    other = "amd" if host.vendor == "intel" else "intel"
    for (leaf, subleaf, reg), modifier in mask.registers.items():
        if leaf in VENDOR_LEAVES.get(other, {}) and modifier.filter:
            problems.append(f"leaf {leaf:#x} ({VENDOR_LEAVES[other][leaf]}) is {other.upper()}-only, "
                            f"but {host.name} is {host.vendor.upper()}")
    for feature in sorted(shown & VENDOR_FEATURES.get(other, set())):
        problems.append(f"{feature} is an {other.upper()} feature, shown on {host.vendor.upper()} host {host.name}")
    return problems


@dataclass(frozen=True)
class Change:
    leaf: int
    subleaf: int
    register: str
    bit: int
    host: int
    guest: int
    rule: str

    @property
    def name(self) -> str:
        return _bit_name(self.leaf, self.subleaf, self.register, self.bit)

    def to_dict(self) -> dict:
        return {"leaf": self.leaf, "subleaf": self.subleaf, "register": self.register, "bit": self.bit,
                "name": self.name, "host": self.host, "guest": self.guest, "rule": self.rule}


def explain(specs, host, evc: str | None = None) -> list[Change]:
    """Each bit the guest sees differently from the host, with the rule that changed it."""
    from .evc import evc_mode
    layers = []  # (mask, fixed reason or None, spec) in the order they apply
    if evc is not None:
        layers.append((evc_mode(evc).mask, f"EVC mode {evc} does not include it", None))
    for spec in specs:
        layers.append((parse_mask(spec), None, spec))
    view = GuestCpuidView.for_host(host, evc, specs)
    changes = []
    for (leaf, subleaf), guest_regs in view.table.items():
        host_regs = host.cpuid.query(leaf, subleaf)
        for i, reg in enumerate(REGISTERS):
            for bit in _bits(guest_regs[i] ^ host_regs[i]):
                rule = _rule(layers, view, leaf, subleaf, reg, bit)
                changes.append(Change(leaf, subleaf, reg, bit, host_regs[i] >> bit & 1, guest_regs[i] >> bit & 1, rule))
    return changes


def _rule(layers, view, leaf, subleaf, reg, bit) -> str:
    masked = view.masked.get((leaf, subleaf), (0, 0, 0, 0))[REGISTERS.index(reg)] >> bit & 1
    final = view.table.get((leaf, subleaf))[REGISTERS.index(reg)] >> bit & 1
    if masked == final:
        for layer in reversed(layers):
            mask, why, spec = layer
            modifier = mask.registers.get((leaf, subleaf, reg))
            if modifier and modifier.filter >> bit & 1:
                if why:
                    return why
                return _mask_rule(spec, mask, leaf, subleaf, reg, bit)
    return {(1, "ecx", 31): "normalisation: the hypervisor bit is set for every guest",
            (1, "ecx", 27): "normalisation: OSXSAVE mirrors the guest's CR4.OSXSAVE",
            (1, "ebx", 24): "normalisation: the guest's APIC ID is 0"}.get(
        (leaf, reg, bit), "normalisation: APIC IDs are 0 and OS-state bits mirror the guest's CR4"
        if leaf in (1, 7, 0xB, 0x1F, 0x8000001E) else "normalisation")


def _mask_rule(spec: str, mask: Mask, leaf, subleaf, reg, bit) -> str:
    feature = catalogue().at(leaf, subleaf, reg, bit)
    modifier = mask.registers[(leaf, subleaf, reg)]
    value = modifier.value >> bit & 1
    if spec.lstrip()[:1] in "+-" and feature:
        items = {item.strip()[1:] for item in spec.split(",")}
        named = {catalogue()[i].name for i in items}
        if feature.name not in named:
            cause = sorted(f for f in named if feature.name in hidden_closure({f}))
            return f"mask {spec}: needs {', '.join(cause) or 'a hidden feature'}, which the mask hides"
        return f"mask {spec}: {'+' if value else '-'}{feature.name}"
    return f"mask {spec}: bit {bit} of {reg} forced to {value} (position {32 - bit} of the bitmap)"
