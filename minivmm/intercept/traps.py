"""Instruction exits: the VMM's hook on the instructions it must handle itself.

The engine translates guest code page by page. With its software TLB in "virtual"
mode, the first instruction fetch from a page asks the VMM for the page's mapping;
at that moment the page is decoded with iced-x86 and a one-address exit is planted on
every instruction that must not run natively: outside the host's ISA (#UD), beyond
the engine (unsupported), LZCNT/TZCNT that run as BSR/BSF, HLT and OUT (exact stops),
and, when auditing, instructions the guest's CPUID view hides. Code that is never
trapped runs at full engine speed.

The decode is a *superset*: an instruction is decoded at every byte offset, so that
whatever alignment execution takes through the page, each instruction start that
needs an exit has one (an exit at an offset that never starts an instruction never
fires). A write to a decoded page re-decodes the bytes it touches (self-modifying code).
"""

from __future__ import annotations

from collections.abc import Callable

import iced_x86
from unicorn import (UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_HOOK_CODE, UC_HOOK_MEM_WRITE, UC_HOOK_TLB_FILL, UC_MEM_FETCH, UC_MEM_WRITE, UC_PROT_ALL,
                     UC_PROT_READ, UC_PROT_WRITE, UC_TLB_VIRTUAL)

PAGE = 0x1000
MAX_INSN = 15

# classify(instr) -> (action or None, audited features): what an exit at this instruction does.
Classifier = Callable[[object], tuple[str | None, frozenset[str]]]


class InstructionExits:
    def __init__(self, ram, classify: Classifier, on_exit):
        """``ram`` is guest memory as a host buffer: reading it through the engine from
        inside a TLB fill would re-enter the TLB. ``on_exit(uc, address, size, action,
        audited, instr)`` runs when a planted exit fires."""
        self.ram = ram
        self.memory = len(ram)
        self._classify = classify
        self._on_exit = on_exit
        self.pages: dict[int, dict[int, tuple]] = {}   # page -> {address: (action, audited, instr)}
        self._hooks: dict[int, int] = {}               # address -> hook handle
        self._uc = None
        self._dirty: set[int] | None = None            # pages written since tracking began

    def install(self, uc) -> None:
        self._uc = uc
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.hook_add(UC_HOOK_TLB_FILL, self._fill)

    # -- the TLB: identity mapping, decoding on first execution --------------------------

    def track(self, dirty: set[int] | None) -> None:
        """Record into ``dirty`` each page the guest writes from now on (None stops).

        The TLB is flushed, so a page's first write after it asks for a mapping; a read
        is mapped read-only while tracking, so a later write asks again. Decoded pages
        stay writable: their write hook records them."""
        self._dirty = dirty
        self._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _fill(self, uc, vaddr, access, entry, _ud):
        page = vaddr & ~(PAGE - 1)
        entry.paddr = page
        if access == UC_MEM_FETCH and page < self.memory:
            self._decode_page(page)
        if self._dirty is not None and access == UC_MEM_WRITE:
            self._dirty.add(page)
        # Only decoded pages are executable: a data access to an undecoded page must not
        # let a later fetch skip the decode. Beyond RAM nothing is mapped: the access
        # itself reports the fault (the engine also probes its stop address this way).
        if page in self.pages or page >= self.memory:
            entry.perms = UC_PROT_ALL
        elif self._dirty is not None and access != UC_MEM_WRITE:
            entry.perms = UC_PROT_READ
        else:
            entry.perms = UC_PROT_READ | UC_PROT_WRITE
        return True

    def _decode_page(self, page: int) -> None:
        if page in self.pages:
            return
        self.pages[page] = {}
        self._update(page, range(PAGE))
        self._uc.hook_add(UC_HOOK_MEM_WRITE, self._written, None, page, page + PAGE - 1)

    def _bytes(self, page: int, patch: tuple[int, bytes] | None = None) -> bytes:
        end = min(page + PAGE + MAX_INSN, self.memory)
        data = bytearray(self.ram[page:end])
        if patch:
            at, new = patch
            for i, b in enumerate(new):
                if 0 <= at - page + i < len(data):
                    data[at - page + i] = b
        return bytes(data)

    def _update(self, page: int, offsets, patch=None) -> None:
        data = self._bytes(page, patch)
        decoder = iced_x86.Decoder(64, data, ip=page)
        traps = self.pages[page]
        for offset in offsets:
            address = page + offset
            decoder.position, decoder.ip = offset, address
            instr = decoder.decode()
            action, audited = self._classify(instr)
            wanted = (action, audited, instr) if (action or audited) else None
            current = traps.get(address)
            if wanted and current and (current[0], current[1], current[2].code) == (action, audited, instr.code):
                traps[address] = wanted  # same exit, new operands
                continue
            if current:
                del traps[address]
                self._uc.hook_del(self._hooks.pop(address))
            if wanted:
                traps[address] = wanted
                self._hooks[address] = self._uc.hook_add(UC_HOOK_CODE, self._fire, None, address, address)

    def forget(self, address: int) -> None:
        """Drop a page's decode (after the VMM itself rewrote it)."""
        page = address & ~(PAGE - 1)
        for traps_at in self.pages.pop(page, {}):
            self._uc.hook_del(self._hooks.pop(traps_at))

    def _written(self, uc, _access, address, size, value, _ud):
        """Self-modifying code: re-decode every offset whose instruction the write touches."""
        new = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        for page in {address & ~(PAGE - 1), (address + size - 1) & ~(PAGE - 1)}:
            if self._dirty is not None:
                self._dirty.add(page)
            if page in self.pages:
                start = max(0, address - page - MAX_INSN + 1)
                end = min(PAGE, address - page + size)
                self._update(page, range(start, end), (address, new))

    def _fire(self, uc, address, size, _ud):
        trap = self.pages.get(address & ~(PAGE - 1), {}).get(address)
        if trap:
            self._on_exit(uc, address, size, *trap)
