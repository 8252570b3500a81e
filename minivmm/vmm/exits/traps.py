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
fires). Bytes written to a decoded page are decoded again before code there is next
translated (self-modifying code).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import iced_x86
from unicorn import (UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_MEM_FETCH, UC_MEM_READ, UC_MEM_WRITE,
                     UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, UC_TLB_VIRTUAL)

from .. import engine

PAGE = 0x1000
MAX_INSN = 15
SHARED_HOOKS_FROM = 256         # exits above which a counted start hooks them by page
RESIDENT_PAGES = 32             # pages whose exits stay hooked, at first (see _reside)
MAX_RESIDENT_PAGES = 1 << 16
TRAP = 1 << 50                  # where refused pages map: no memory, above every user address, below 2^52
_NEEDS = {UC_MEM_FETCH: UC_PROT_EXEC, UC_MEM_WRITE: UC_PROT_WRITE, UC_MEM_READ: UC_PROT_READ}

# Legacy prefixes and REX, which may stand before an opcode (at most 14 of them).
PREFIXES = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3" + bytes(range(0x40, 0x50)))
# The opcode of every instruction an exit is planted on: an instruction that needs a
# CPUID feature lies behind the 0F escape or a VEX, EVEX or XOP prefix (C4, C5, 62, 8F),
# or is one of the few one-byte opcodes that need one (x87's D8-DF: FISTTP is SSE3's,
# FCMOV and FCOMI CMOV's; LAHF/SAHF; RTM's XABORT C6 F8 and XBEGIN C7 F8); WAIT (9B),
# which raises a pending x87 exception (x87.py); then HLT,
# OUT, IN, OUTS and INS (#GP at a Linux program's CPL 3 with IOPL 0, which the engine
# does not check); and the LOCK prefix, which the engine accepts where the CPU raises #UD.
# The two-byte opcodes of the 0F map that never exit are left out: NOP Ev (0F 1F), Jcc
# (0F 80-8F), SETcc (0F 90-9F), CMOVcc (0F 40-4F), IMUL (0F AF), MOVZX/MOVSX (0F B6 B7
# BE BF), whatever prefixes stand before them (a third of a program's matches).
# (Tested over the whole one-byte opcode map and these 0F rows, and against decoding
# every offset of real binaries.)
OPCODES = re.compile(rb"\x0f(?![\x1f\x40-\x4f\x80-\x9f\xaf\xb6\xb7\xbe\xbf])"
                     rb"|[\xc4\xc5\x62\x8f\x9b\x9e\x9f\xd8-\xdf\xf4\xe4-\xe7\xec-\xef\x6c-\x6f\xf0]"
                     rb"|[\xc6\xc7]\xf8")


def exit_candidates(data: bytes, first: int, last: int, swept_only: bytes = b"") -> tuple[set[int], set[int]]:
    """The offsets in [first, last) where an instruction an exit may be planted on can
    start: an opcode byte above, or up to 14 prefixes before one. Decoding only these
    is the superset decode, without the offsets that cannot matter (most of a page).
    Returned as (offsets to decode, offsets to decode only where a linear sweep starts
    an instruction): those whose opcode is in ``swept_only``, whose every instruction
    exits only where a sweep finds it (see ``swept``)."""
    every, sweep = set(), set()
    for match in OPCODES.finditer(data, first, min(len(data), last + MAX_INSN - 1)):
        at = match.start()
        out = sweep if data[at] in swept_only else every
        offset = at
        while True:
            if first <= offset < last:
                out.add(offset)
            if offset == 0 or at - offset >= MAX_INSN - 1 or data[offset - 1] not in PREFIXES:
                break
            offset -= 1
    return every, sweep - every


def misused_lock(data: bytes, offset: int, ip: int):
    """The instruction at ``offset`` when only its LOCK prefix makes it invalid: the CPU
    raises #UD for LOCK on an instruction or operand that cannot take it (SDM Vol. 2A,
    LOCK), and the engine runs it. None otherwise."""
    instr = iced_x86.Decoder(64, data[offset:offset + MAX_INSN], iced_x86.DecoderOptions.NO_INVALID_CHECK,
                             ip=ip).decode()
    return instr if instr.code != iced_x86.Code.INVALID and instr.has_lock_prefix else None


# A VEX encoding that defines no instruction is #UD on every CPU (SDM Vol. 2A, 2.3.12),
# but the engine runs some as the legacy instruction of the same map, opcode and
# prefix (VEX forms of MOVBE, RDRAND, ADCX, POPCNT ...): where that one would exit as
# #UD or must not run on the engine, so does the VEX form. (Those the engine runs as
# an instruction the host has run so: a fidelity gap, as in older QEMU.) EVEX is the
# engine's #UD in 64-bit mode, an undefined XOP form its POP.
_VEX_MAPS = {1: b"\x0f", 2: b"\x0f\x38", 3: b"\x0f\x3a"}
_VEX_PREFIXES = (b"", b"\x66", b"\xf3", b"\xf2")


def engine_form(data: bytes, offset: int):
    """The legacy instruction the engine runs for the undefined VEX encoding at
    ``offset`` (after legacy prefixes), or None where it is not one."""
    at = offset
    while at < len(data) and at - offset < MAX_INSN and data[at] in PREFIXES:
        at += 1
    if at + 3 > len(data) or data[at] not in (0xC4, 0xC5):
        return None
    first = data[at + 1]
    if data[at] == 0xC5:
        rex, escape, pp, rest = (~first >> 5) & 4, _VEX_MAPS[1], first & 3, at + 2
    else:
        second = data[at + 2]
        escape, pp, rest = _VEX_MAPS.get(first & 0x1F), second & 3, at + 3
        rex = (~first >> 5) & 7 | (second >> 4) & 8
        if escape is None:
            return None  # a map the engine refuses
    code = _VEX_PREFIXES[pp] + (bytes([0x40 | rex]) if rex else b"") + escape + data[rest:rest + MAX_INSN]
    instr = iced_x86.Decoder(64, code, ip=0).decode()
    return None if instr.code == iced_x86.Code.INVALID else instr


# Exits on one-byte opcodes whose bytes sit inside immediates, displacements and ModR/M
# bytes all over a large program: a Linux program's IN, OUT, INS and OUTS (E4-E7, EC-EF,
# 6C-6F: #GP at CPL 3), the x87 instructions minivmm carries out or checks (D8-DF,
# WAIT's 9B), and a LOCK prefix on what cannot take it (F0: every -16 displacement). An exit at every such byte put thousands of hooks on a large program's pages
# (python3: about 17,000), and the engine checks every hook for each instruction it
# translates, which made it minutes slower. These exits go only where a linear sweep of
# the page starts an instruction, as a compiler lays code out. One the sweep misses runs
# as the engine runs it: port I/O reaches an empty bus (IoExits.linux), an x87
# instruction sets the engine's flags, an x87 control load that unmasks exceptions goes
# unnoticed (no #MF follows), a misused LOCK runs as the instruction without it. Exits
# that raise #UD because the host lacks a feature are never swept: a missed one would
# run what the host lacks.
PORT_IO = frozenset(getattr(iced_x86.Mnemonic, name) for name in ("IN", "OUT", "INSB", "INSW", "INSD", "OUTSB",
                                                                   "OUTSW", "OUTSD"))


def swept(action: str | None, instr, fast: bool = True) -> bool:
    """Whether this exit goes only where a linear sweep starts an instruction (x87
    control loads only with the fast paths: without them, as before, at every offset)."""
    return action == "x87" or fast and action == "x87 control" or action == "gp" and instr.mnemonic in PORT_IO


def linear_sweep(data: bytes) -> set[int]:
    """The offsets where instructions start when ``data`` is decoded from its first byte
    to the end of its first page."""
    return {instr.ip for instr in iced_x86.Decoder(64, data[:PAGE], ip=0)}


# classify(instr) -> (action or None, audited features): what an exit at this instruction
# does. Its attribute ``swept_only`` names the opcode bytes after which every instruction
# exits only where a linear sweep finds it (on this host, for this guest).
Classifier = Callable[[object], tuple[str | None, frozenset[str]]]


class InstructionExits:
    def __init__(self, ram, classify: Classifier, on_exit, on_error, refusals=None):
        """``ram`` is guest memory as a host buffer: reading it through the engine from
        inside a TLB fill would re-enter the TLB. ``on_exit(uc, address, size, action,
        audited, instr)`` runs when a planted exit fires; ``on_error(exception)`` gets
        what a fill raised (it must stop the engine). ``refusals`` (an EngineRefusals)
        names the exits the engine's own #UD takes instead (:meth:`on_refused`); None
        plants every exit."""
        self.ram = ram
        self.memory = len(ram)
        self._classify = classify
        self._swept_only = getattr(classify, "swept_only", b"")
        self._refusals = refusals
        self._fast = refusals is not None   # the fast paths (refusals.fast_paths): misused LOCK swept too
        self._refused: set[int] = set()                # exits not planted: the engine refuses them
        self._parked: set[int] = set()                 # exits in the engine's list of stops (see _hook)
        self._parked_changed = False
        self._resident: dict[int, None] = {}           # pages whose exits are hooked, least recent first
        self._evicting = False
        self.evicted = False       # the last start ended for an eviction (resume at RIP)
        # doubled while the pages in use do not fit; at least 8, so that an eviction keeps
        # 4 pages and the next needs more new ones than one block's translation reads (3:
        # the page before, whose last instruction may end in it, and the one after), so
        # that a block runs between two evictions
        self._limit = max(RESIDENT_PAGES, 8)
        self._admitting = ()           # the pages a fetch is hooking the exits of
        self._rehooked = 0             # evicted pages hooked again since the last eviction
        self.evictions = True      # off while the VMM runs a stub of its own
        self._on_exit = on_exit
        self._on_error = on_error
        self._keep = None
        self.pages: dict[int, dict[int, tuple]] = {}   # page -> {address: (action, audited, instr)}
        self._hooks: dict[int, tuple] = {}             # address (or page, while counting) -> hook
        self._by_page = False
        self._counted = False
        self._uc = None
        self._dirty: set[int] | None = None            # pages written since tracking began
        self._seen: dict[int, bytes] = {}              # page -> its bytes when last decoded
        self._tails: dict[int, bytes] = {}             # page -> the next page's first bytes its decode read
        self.retry: set[int] = set()                   # pages whose fetch abandoned a translation
        self._stale: set[int] = set()                  # decoded pages written since
        self._quiet: set[int] = set()                  # addresses whose audit-only exit is removed
        # A Linux program's page protections (PROT_* bits, one byte per page): a page
        # they forbid the access to maps to TRAP + its address, where nothing is, so the
        # access itself ends the start on the unmapped-memory hook, at the instruction,
        # with the exact address. (Refusing the fill instead would unwind the engine from
        # its own lookups too: it translates code addresses when it deletes hooks.)
        self.protection: bytearray | None = None
        self.on_code_change = None   # (first, last): the exits of [first, last) changed
        self.after_exit = None       # (address): an exit fired (a planted one, or through on_refused)
        self.quick = None            # (machine-code hook, its user data): planted exits' hook, which
                                     # calls raw_fire for what it does not take itself (exits/quick.py)

    def install(self, uc) -> None:
        self._uc = uc
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        if self._fast:
            uc.ctl_exits_enabled(True)   # RIP stops only at parked exits (no "until" address)
        fill, on_error = self._fill, self._on_error

        # A fill runs for every page the guest touches after a flush: the raw C hook
        # saves the binding's three Python frames per call.
        def on_fill(_h, vaddr, access, entry, _ud):
            try:
                return fill(vaddr, access, entry[0])
            except BaseException as e:  # never let an exception vanish inside ctypes
                on_error(e)
                return False

        self._keep = engine.add_tlb_fill_hook(uc, on_fill)

    # -- the TLB: identity mapping, decoding on first execution --------------------------

    def track(self, dirty: set[int] | None) -> None:
        """Record into ``dirty`` each page the guest writes from now on (None stops).
        The TLB is emptied, so that each page's first write asks for a mapping."""
        self._dirty = dirty
        self.flush_tlb()

    def flush_tlb(self) -> None:
        """Empty the engine's TLB. Only at a flush does the engine resize it to the guest's
        working set, so the run loop flushes between slices: a guest streaming through
        megabytes would otherwise miss (and call the VMM) on nearly every page it touches."""
        self._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    # -- the TLB: identity mapping, decoding on first execution --------------------------
    # A decoded page is never writable and executable at once: a write asks for a
    # mapping (the page is then marked stale and mapped without execute), and the next
    # translation of code there asks again (the changed bytes are re-decoded first).
    # Exits change only in fills, between blocks; a write hook changing them mid-block
    # would make the engine re-run the block's earlier instructions.

    def _fill(self, vaddr, access, entry) -> bool:
        page = vaddr & ~(PAGE - 1)
        entry.paddr = page
        if self.protection is not None and page < self.memory:
            allowed = self.protection[page >> 12]
            if not allowed & _NEEDS.get(access, UC_PROT_READ):
                entry.paddr, entry.perms = TRAP + page, UC_PROT_ALL
                return True
            self._map(page, access, entry)
            entry.perms &= allowed & UC_PROT_ALL  # PROT_READ/WRITE/EXEC have UC_PROT_*'s values
            return True
        self._map(page, access, entry)
        return True

    def _map(self, page, access, entry) -> None:
        if page >= self.memory:
            entry.perms = UC_PROT_ALL  # nothing is mapped there: the access itself faults
            return
        if access == UC_MEM_FETCH:
            if self._evicting:   # the engine's own lookup while it drops translated code
                entry.perms = UC_PROT_READ | UC_PROT_EXEC
                return
            self._admitting = (page - PAGE, page)
            try:
                self._reside(page)
                if self._tail_changed(page):
                    entry.paddr, entry.perms = TRAP + page, UC_PROT_ALL
                    return
                if page in self._stale:
                    self._refresh(page)
                else:
                    self._decode_page(page)
            finally:
                self._admitting = ()
            if len(self._resident) > self._limit and self._evicts():
                self._shrink()
            entry.perms = UC_PROT_READ | UC_PROT_EXEC
            return
        decoded = page in self.pages
        if access == UC_MEM_WRITE:
            if decoded:
                self._stale.add(page)
            if self._dirty is not None:
                self._dirty.add(page)
            entry.perms = UC_PROT_READ | UC_PROT_WRITE
        elif decoded and page not in self._stale and (page in self._resident or not self._evicts()
                                                      or not self._hookable(page)):
            entry.perms = UC_PROT_READ | UC_PROT_EXEC   # (else the first fetch asks, and hooks its exits)
        elif decoded or (self._dirty is not None and page not in self._dirty):
            entry.perms = UC_PROT_READ
        else:
            entry.perms = UC_PROT_READ | UC_PROT_WRITE

    def _decode_page(self, page: int) -> None:
        if page in self.pages:
            return
        self.pages[page] = {}
        self._update(page, range(PAGE))
        self._seen[page] = bytes(self.ram[page:page + PAGE])
        self._tails[page] = self._head(page + PAGE)

    # An instruction may start in a page's last bytes and end in the next page: its exit
    # was decided with the next page's first bytes as they were. Whatever changes them
    # (the guest's store, the VMM's) leaves the next page without execute permission, so
    # translating that instruction again asks for the next page, here: the first page's
    # last offsets are decoded again, and this translation is abandoned (the fetch lands
    # on TRAP, nothing of the block ran), so that it starts over with their exits
    # (retrying, then resume at RIP).

    def _head(self, page: int) -> bytes:
        return bytes(self.ram[page:min(page + MAX_INSN - 1, self.memory)])

    def _tail_changed(self, page: int) -> bool:
        before = page - PAGE
        if before not in self.pages or self._tails.get(before) == self._head(page):
            return False
        self._update(before, range(PAGE - MAX_INSN + 1, PAGE))
        self._tails[before] = self._head(page)
        self.retry.add(page)
        return True

    def retrying(self, page: int) -> bool:
        """Whether a fetch the engine stopped on at TRAP + ``page`` abandoned a
        translation (see _tail_changed): the run resumes at RIP, nothing to deliver."""
        if page in self.retry:
            self.retry.discard(page)
            self.flush_tlb()
            return True
        return False

    def _refresh(self, page: int) -> None:
        """Re-decode what changed on a page since it was last decoded (self-modifying code,
        or data that shares the page with code)."""
        self._stale.discard(page)
        now = bytes(self.ram[page:page + PAGE])
        before = self._seen[page]
        chunk = 64
        for at in range(0, PAGE, chunk):
            if now[at:at + chunk] != before[at:at + chunk]:
                self._update(page, range(max(0, at - MAX_INSN + 1), at + chunk))
        self._seen[page] = now

    def _bytes(self, page: int) -> bytes:
        return bytes(self.ram[page:min(page + PAGE + MAX_INSN, self.memory)])

    def exit_at(self, address: int):
        """The exit planted at ``address``: (action, audited features, instruction), or None."""
        return self.pages.get(address & ~(PAGE - 1), {}).get(address)

    def _update(self, page: int, offsets: range) -> None:
        if self.on_code_change:
            self.on_code_change(page + offsets.start - MAX_INSN, page + offsets.stop + MAX_INSN)
        data = self._bytes(page)
        decoder = iced_x86.Decoder(64, data, ip=page)
        traps = self.pages[page]
        starts, swept_starts = exit_candidates(data, offsets.start, offsets.stop, self._swept_only)
        sweep = None
        if swept_starts:
            sweep = linear_sweep(data)
            starts |= swept_starts & sweep
        for address in [a for a in traps if offsets.start <= a - page < offsets.stop and a - page not in starts]:
            del traps[address]  # those bytes can no longer start an instruction that exits
            self._unhook(address)
            self._refused.discard(address)
        for offset in sorted(starts):
            address = page + offset
            decoder.position, decoder.ip = offset, address
            instr = decoder.decode()
            misused = instr.code == iced_x86.Code.INVALID and misused_lock(data, offset, address)
            # a misused LOCK goes where a sweep finds it only if the engine, running the
            # instruction without it, runs what the host has exactly
            sweeps_lock = misused and self._fast and self._classify(misused) == (None, frozenset())
            if misused:
                instr, (action, audited) = misused, ("ud", frozenset())
            elif instr.code == iced_x86.Code.INVALID and self._engine_would_run(data, offset):
                action, audited = "ud", frozenset()
            else:
                action, audited = self._classify(instr)
            if sweeps_lock or swept(action, instr, self._fast):
                sweep = linear_sweep(data) if sweep is None else sweep
                action = action if offset in sweep else None
            if not action and address in self._quiet:
                audited = frozenset()
            wanted = (action, audited, instr) if (action or audited) else None
            refused = bool(wanted) and self._refusals is not None and action in ("ud", "unsupported") \
                and not misused and self._refusals.refuses(data[offset:offset + MAX_INSN], instr.len)
            current = traps.get(address)
            if wanted and current and (current[0], current[1], current[2].code) == (action, audited, instr.code) \
                    and refused == (address in self._refused):
                traps[address] = wanted  # same exit, new operands
                continue
            if current:
                del traps[address]
                self._unhook(address)
                self._refused.discard(address)
            if wanted:
                traps[address] = wanted
                if refused:
                    self._refused.add(address)
                self._hook(address)
        self.sync_parked()

    def _engine_would_run(self, data: bytes, offset: int) -> bool:
        """An undefined VEX encoding at ``offset`` that the engine would run as a legacy
        instruction the host lacks, or must run natively (see engine_form)."""
        legacy = engine_form(data, offset)
        return legacy is not None and self._classify(legacy)[0] in ("ud", "unsupported")

    def note_write(self, address: int, size: int) -> None:
        """The VMM wrote guest RAM itself (a Linux system call filling a buffer): the
        pages count as dirty for pre-copy, and code on them is decoded again before it
        next runs (the TLB forgets them, so the next fetch asks)."""
        first, last = address & ~(PAGE - 1), (address + max(size, 1) - 1) & ~(PAGE - 1)
        pages = range(first, last + PAGE, PAGE)
        if self._dirty is not None:
            self._dirty.update(pages)
        decoded = [page for page in pages if page in self.pages]
        if decoded:
            self._stale.update(decoded)
            self.flush_tlb()
            # Code translated from those bytes is stale too: the engine sees only the
            # writes it makes itself.
            self._uc.ctl_remove_cache(first, last + PAGE)

    def quieten(self, address: int) -> None:
        """Remove an exit that only audits (call between engine starts, not from a hook)."""
        self._quiet.add(address)
        trap = self.pages.get(address & ~(PAGE - 1), {}).get(address)
        if trap and not trap[0]:
            del self.pages[address & ~(PAGE - 1)][address]
            self._unhook(address)

    def forget_all(self) -> None:
        """Decode every page again before its code next runs, and translate it again
        (call between engine starts): what is an exit has changed."""
        for page in list(self.pages):
            self.forget(page)
        self.flush_tlb()
        self._uc.ctl_flush_tb()

    def forget(self, address: int) -> None:
        """Drop a page's decode (after the VMM itself rewrote it)."""
        page = address & ~(PAGE - 1)
        if self.on_code_change:
            self.on_code_change(page - MAX_INSN, page + PAGE + MAX_INSN)
        # The engine may fill its TLB while it deletes a hook: the page stays known until
        # its hooks are gone.
        for traps_at in list(self.pages.get(page, {})):
            self._unhook(traps_at)
            self._refused.discard(traps_at)
        self.sync_parked()
        self.pages.pop(page, None)
        self._resident.pop(page, None)
        self._seen.pop(page, None)
        self._tails.pop(page, None)
        self._stale.discard(page)

    # -- the engine's hooks ---------------------------------------------------------------
    # One hook per exit address costs nothing until it fires: the engine calls it only
    # where it was planted. But a counted start calls into the engine's hook list at
    # every instruction and checks every hook there (thousands on glibc's pages: about
    # 50 k instructions/s). While counting with that many, a page's exits share one hook
    # over the page (every instruction there then calls in: a few exits stay apart).

    # An exit that raises #UD is parked rather than hooked (with the fast paths, in starts
    # that do not count): the engine stops before an address in its list of stops, which
    # it looks up in a balanced tree while translating, not a list it walks. Stopping
    # costs a start's round trip, which a fault delivered to the guest can afford; the
    # run loop fires the exit then (fire_parked). On penryn's glibc and python3, 611 of
    # 757 planted exits are such #UDs.

    def _hook(self, address: int) -> None:
        if address in self._refused and not self._counted:
            return  # the engine's own #UD reaches on_refused (a counted start plants it: see counting)
        if self._fast and not self._counted and self.exit_at(address)[0] == "ud":
            self._parked.add(address)
            self._parked_changed = True
            return
        page = address & ~(PAGE - 1)
        if self._evicts():
            if page not in self._resident and page not in self._admitting:
                return   # hooked when its page is next fetched (_reside)
            self._resident[page] = self._resident.pop(page, None)
        if self._counted and not self._by_page and len(self._hooks) >= SHARED_HOOKS_FROM:
            self._rehook(True)  # the count of exits grew past the point while counting
        key = address & ~(PAGE - 1) if self._by_page else address
        if key not in self._hooks:
            if self.quick is not None and not self._by_page:  # machine code first (exits/quick.py)
                self._hooks[key] = engine.add_code_hook(self._uc, self.quick[0], key, key, self.quick[1])
            else:
                end = key + PAGE - 1 if self._by_page else address
                self._hooks[key] = engine.add_code_hook(self._uc, self.raw_fire, key, end)

    def _unhook(self, address: int) -> None:
        if address in self._parked:
            self._parked.discard(address)
            self._parked_changed = True
            return
        page = address & ~(PAGE - 1)
        key = page if self._by_page else address
        if key in self._hooks and not (self._by_page and self.pages.get(page)):
            engine.del_hook(self._uc, self._hooks.pop(key)[1])

    # The engine walks its whole list of hooks for every instruction it translates and
    # every hook that fires, so the list holds only the exits of pages fetched lately
    # (with the fast paths, in starts that do not count): a page's exits are hooked when
    # the engine fetches code from it, and once more than RESIDENT_PAGES pages hold
    # hooks, the least recently fetched half lose theirs. Deleting a hook drops every
    # block translated with it; the engine forgets deleted hooks only when a start
    # ends, so the start is ended (``evicted``: the run resumes at RIP), and the next
    # empties the TLB first, so that code on those pages is translated again only after
    # a fetch has hooked their exits anew (a read maps them without execute
    # permission meanwhile). sort on haswell fires 32 of its 625 exits.

    def _evicts(self) -> bool:
        return self._fast and not self._counted and self.evictions

    def _hookable(self, page: int) -> bool:
        """Whether some exit on ``page`` is hooked (neither refused nor parked)."""
        return any(a not in self._refused and a not in self._parked for a in self.pages.get(page, ()))

    def _reside(self, page: int) -> None:
        """The engine fetches code from ``page``: the exits of the page (and of the one
        before, whose last instruction may end here) are hooked, their pages the most
        recent (past the limit, the least recent half lose theirs: _shrink)."""
        if not self._evicts():
            return
        for at in (page - PAGE, page):
            if at in self._resident:
                self._resident[at] = self._resident.pop(at)
            elif self._hookable(at):
                self._rehooked += 1
                for address in self.pages[at]:
                    self._hook(address)

    def _shrink(self) -> None:
        if self._rehooked > self._limit // 2:   # evicted pages came back: those in use do not fit
            self._limit = min(self._limit * 2, MAX_RESIDENT_PAGES)
        else:
            self._evict(self._limit // 2)
        self._rehooked = 0

    def _evict(self, keep: int) -> None:
        """Unhook all but the ``keep`` most recently fetched pages (inside a fill, as a
        translation starts: the two pages it may read are the most recent) and end
        the start."""
        self._evicting = True
        try:
            while len(self._resident) > keep:
                page = next(iter(self._resident))
                del self._resident[page]
                for address in self.pages.get(page, ()):
                    hook = self._hooks.pop(address, None)
                    if hook is not None:
                        engine.del_hook(self._uc, hook[1])
        finally:
            self._evicting = False
        self.evicted = True
        self._uc.emu_stop()

    def after_eviction(self) -> None:
        """Between starts, after _evict ended one: the TLB forgets the unhooked pages, so
        that their code is fetched (and their exits hooked) before it is translated."""
        self.evicted = False
        self.flush_tlb()

    def counting(self, on: bool) -> None:
        """Choose the way of hooking for the next starts (between starts; the caller
        flushes translated code). A counted start plants the exits the engine refuses
        too: a planted exit fires before the count of the instruction is checked."""
        replant = on != self._counted and (bool(self._refused) or self._fast)
        self._counted = on
        self._rehook(on and sum(map(len, self.pages.values())) > SHARED_HOOKS_FROM, replant)

    def _rehook(self, by_page: bool, replant: bool = False) -> None:
        if by_page == self._by_page and not replant:
            return
        for _, handle in self._hooks.values():
            engine.del_hook(self._uc, handle)
        self._hooks.clear()
        self._parked.clear()
        self._parked_changed = True
        self._by_page = by_page
        for traps in self.pages.values():
            for address in traps:
                self._hook(address)
        self.sync_parked()
        self.flush_tlb()   # a page not resident is fetched anew before its code runs

    def sync_parked(self) -> None:
        """Give the engine the parked exits, if they changed (between blocks; only the
        fast paths park, and only they have the engine stop at exits)."""
        if self._parked_changed and self._fast:
            self._parked_changed = False
            self._uc.ctl_set_exits(sorted(self._parked))

    def fire_parked(self, uc, address: int) -> bool:
        """The engine stopped at ``address`` (RIP) for no other reason: if an exit is
        parked there, it fires (True); False otherwise."""
        if address not in self._parked:
            return False
        self._fire(uc, address, self.exit_at(address)[2].len, None)
        return True

    def on_refused(self, uc, address: int) -> bool:
        """The engine refused the instruction at ``address`` (RIP): if an exit is there
        that was left to this refusal, it fires as a planted one would (True); False
        otherwise."""
        if address not in self._refused:
            return False
        action, audited, instr = self.exit_at(address)
        self._on_exit(uc, address, instr.len, action, audited, instr)
        if self.after_exit:
            self.after_exit(address)
        return True

    def raw_fire(self, _handle, address, size, _ud):
        try:
            self._fire(self._uc, address, size, None)
        except BaseException as e:  # never let an exception vanish inside ctypes
            self._on_error(e)

    def _fire(self, uc, address, size, _ud):
        trap = self.pages.get(address & ~(PAGE - 1), {}).get(address)
        if trap:
            self._on_exit(uc, address, size, *trap)
            if self.after_exit:
                self.after_exit(address)
