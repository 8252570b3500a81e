"""The guest CPUID view: what the guest's CPUID instruction returns.

This is where every CPUID answer is computed. The view is the host profile's table,
passed through the VM's mask, then normalised as a hypervisor presents a virtual CPU
(docs/abi.md). It is frozen when the VM powers on and travels with it.
"""

from __future__ import annotations

from ..cpu.features import catalogue
from ..cpu.table import EXTENDED, CpuidTable, Regs
from ..errors import MinivmmError
from .evc import evc_mode, require_supported
from .formats import parse_mask
from .mask import Mask

HYPERVISOR_BIT = 1 << 31   # CPUID.1:ECX[31], reserved for hypervisors to set
OSXSAVE_BIT = 1 << 27      # CPUID.1:ECX[27] mirrors CR4.OSXSAVE (bit 18)
OSPKE_BIT = 1 << 4         # CPUID.7.0:ECX[4] mirrors CR4.PKE (bit 22)
CR4_OSXSAVE = 1 << 18
CR4_PKE = 1 << 22
HYPERVISOR_LEAF = 0x40000000
HYPERVISOR_SIGNATURE = b"minivmm\0\0\0\0\0"


def build_mask(host, evc: str | None = None, masks=()) -> Mask:
    """The VM's mask: the EVC mode's, then each user mask in order. Refused, as VMware
    refuses to power on, if the host cannot run the mode or fails a T/F mark."""
    parts = [m if isinstance(m, Mask) else parse_mask(m) for m in masks]
    if evc is not None:
        mode = evc_mode(evc)
        require_supported(mode, host)
        parts.insert(0, mode.mask)
    mask = Mask.compose(parts)
    problems = mask.power_on_violations(host.cpuid)
    if problems:
        raise MinivmmError(f"cannot power on on {host.name}: {'; '.join(problems)}")
    return mask


def _normalise(table: CpuidTable) -> dict[tuple[int, int], Regs]:
    entries = dict(table)
    a, b, c, d = table.query(1, 0)
    # Every vCPU of this VM is CPU 0 (initial APIC ID in EBX[31:24]).
    entries[(1, 0)] = (a, b & 0x00FFFFFF, (c | HYPERVISOR_BIT) & ~OSXSAVE_BIT, d)
    for (leaf, sub), (a, b, c, d) in table.items():
        if leaf in (0xB, 0x1F):          # x2APIC ID
            entries[(leaf, sub)] = (a, b, c, 0)
        elif leaf == 0x8000001E:         # AMD extended APIC ID
            entries[(leaf, sub)] = (0, b & ~0xFF, c & ~0xFF, d)
        elif leaf == 7 and sub == 0:
            entries[(leaf, sub)] = (a, b, c & ~OSPKE_BIT, d)
    return entries


class GuestCpuidView:
    """A frozen table plus the few bits that mirror live CPU state."""

    def __init__(self, host_table: CpuidTable, mask: Mask = Mask()):
        self.mask = mask
        self.masked = mask.apply(host_table)
        self.table = CpuidTable(_normalise(self.masked), host_table.origin)
        self.vendor = host_table.vendor
        self.indexed_leaves = self.table.indexed_leaves
        ebx, ecx, edx = (int.from_bytes(HYPERVISOR_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))
        self._hypervisor_leaf = (HYPERVISOR_LEAF, ebx, ecx, edx)

    @classmethod
    def frozen(cls, table: CpuidTable, mask: Mask = Mask()) -> GuestCpuidView:
        """A view saved earlier (a snapshot's): its table is already the guest's."""
        view = cls(table, Mask())
        view.mask, view.masked, view.table = mask, table, table
        return view

    @classmethod
    def for_host(cls, host, evc: str | None = None, masks=()) -> GuestCpuidView:
        return cls(host.cpuid, build_mask(host, evc, masks))

    def has(self, feature) -> bool:
        """The view shows ``feature`` (a name or a catalogue entry): its bit is set in a
        leaf the maximum leaf covers.
        Above it, Intel CPUs answer with the highest basic leaf's data (SDM Vol. 2A,
        CPUID), which names no feature: Linux and every careful program check the
        maximum first (arch/x86/kernel/cpu/common.c, get_cpu_cap)."""
        if isinstance(feature, str):
            feature = catalogue()[feature]
        return self.table.in_range(feature.leaf) and feature.is_set(self.table.query(feature.leaf, feature.subleaf))

    def answer(self, leaf: int, subleaf: int, cr4: int) -> Regs:
        """CPUID(leaf, subleaf) for a guest whose CR4 is ``cr4``."""
        if leaf == HYPERVISOR_LEAF:
            # With the hypervisor bit set, 0x40000000 is the hypervisor's vendor leaf
            # (the convention KVM, Xen, Hyper-V and VMware share).
            return self._hypervisor_leaf
        if HYPERVISOR_LEAF < leaf < EXTENDED and leaf <= 0x4FFFFFFF:
            return (0, 0, 0, 0)
        a, b, c, d = self.table.query(leaf, subleaf)
        if leaf == 1 and cr4 & CR4_OSXSAVE:
            c |= OSXSAVE_BIT
        elif leaf == 7 and subleaf == 0 and cr4 & CR4_PKE:
            c |= OSPKE_BIT
        return (a, b, c, d)

    def seen_with(self, cr4: int) -> CpuidTable:
        """Every answer a guest whose CR4 is ``cr4`` gets, the hypervisor leaf included:
        what ``minivmm cpuid`` shows (with the boot CR4) and a guest's dump would print."""
        entries = {key: self.answer(*key, cr4) for key in self.table}
        # Every leaf in range answers, dumped or not, as a CPU's would (subleaf 0).
        for first in (0, EXTENDED):
            last = min(self.table.query(first, 0)[0], first + 0xFF) if self.table.in_range(first) else first - 1
            for leaf in range(first, last + 1):
                entries.setdefault((leaf, 0), self.answer(leaf, 0, cr4))
        entries[(HYPERVISOR_LEAF, 0)] = self._hypervisor_leaf
        return CpuidTable(entries, self.table.origin)

    LIVE_LEAVES = frozenset({(1, 0), (7, 0)})  # answers that depend on CR4
    LIVE_CR4_BITS = CR4_OSXSAVE | CR4_PKE
