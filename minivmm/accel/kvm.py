"""The machine's own CPU as the host, through the kernel's KVM interface.

The hardware executes everything; only the CPUID table minivmm installs is the
guest's view (the same view code as under the emulator: profile, mask, EVC mode,
normalisation). That is the point EVC rests on, shown on real silicon: a feature
masked out of CPUID still executes.

The guest ABI is the emulator's (docs/abi.md) with one difference the hardware
forces: long mode needs paging, so the VMM identity-maps the first 4 GiB with 2 MiB
pages from tables in a memory slot of its own above guest RAM (CR3 points there).
Ports 0xE9/0xF4/0xF5 arrive as KVM_EXIT_IO, HLT as KVM_EXIT_HLT, a triple fault as
KVM_EXIT_SHUTDOWN. The guest's IDT is delivered by the hardware, which the VMM does
not see: CPUID executions and exceptions are not visible under KVM, and the report
says so. Written on the ioctls of Documentation/virt/kvm/api.rst (linux/kvm.h).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import signal
import struct
import threading
import time

from ..cpu.native import machine_features
from ..errors import MinivmmError

DEVICE = "/dev/kvm"
KVMIO = 0xAE
# exit reasons (linux/kvm.h)
EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_SHUTDOWN, EXIT_FAIL_ENTRY, EXIT_INTR, EXIT_INTERNAL_ERROR = 2, 5, 6, 8, 9, 10, 17
IO_OUT = 1
CPUID_FLAG_SIGNIFICANT_INDEX = 1
CR0_PG, CR4_PAE, EFER_LME, EFER_LMA = 1 << 31, 1 << 5, 1 << 8, 1 << 10
PAGE_TABLES_SLOT, MAPPED = 1, 4 << 30          # the tables map the first 4 GiB
PRESENT_WRITABLE, LARGE = 0x3, 0x80


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                                               "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16)] + \
        [(n, ctypes.c_uint8) for n in ("type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable", "padding")]


class DescriptorTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [(n, Segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + \
        [("gdt", DescriptorTable), ("idt", DescriptorTable)] + \
        [(n, ctypes.c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")] + \
        [("interrupt_bitmap", ctypes.c_uint64 * 4)]


class MemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64)]


class CpuidEntry(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")] + \
        [("padding", ctypes.c_uint32 * 3)]


class Xcr(ctypes.Structure):
    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class Xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("xcrs", Xcr * 16),
                ("padding", ctypes.c_uint64 * 16)]


class Fpu(ctypes.Structure):
    _fields_ = [("fpr", ctypes.c_uint8 * 128), ("fcw", ctypes.c_uint16), ("fsw", ctypes.c_uint16),
                ("ftwx", ctypes.c_uint8), ("pad1", ctypes.c_uint8), ("last_opcode", ctypes.c_uint16),
                ("last_ip", ctypes.c_uint64), ("last_dp", ctypes.c_uint64), ("xmm", ctypes.c_uint8 * 256),
                ("mxcsr", ctypes.c_uint32), ("pad2", ctypes.c_uint32)]


class RunHeader(ctypes.Structure):
    """struct kvm_run up to the exit union, and the union's KVM_EXIT_IO member."""
    _fields_ = [("request_interrupt_window", ctypes.c_uint8), ("immediate_exit", ctypes.c_uint8),
                ("padding1", ctypes.c_uint8 * 6), ("exit_reason", ctypes.c_uint32),
                ("ready_for_interrupt_injection", ctypes.c_uint8), ("if_flag", ctypes.c_uint8),
                ("flags", ctypes.c_uint16), ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("io_direction", ctypes.c_uint8), ("io_size", ctypes.c_uint8), ("io_port", ctypes.c_uint16),
                ("io_count", ctypes.c_uint32), ("io_data_offset", ctypes.c_uint64)]


def _io(nr: int) -> int:
    return KVMIO << 8 | nr


def _iow(nr: int, size: int) -> int:
    return 1 << 30 | size << 16 | KVMIO << 8 | nr


def _ior(nr: int, size: int) -> int:
    return 2 << 30 | size << 16 | KVMIO << 8 | nr


GET_API_VERSION, CREATE_VM, GET_VCPU_MMAP_SIZE, CREATE_VCPU, RUN = _io(0x00), _io(0x01), _io(0x04), _io(0x41), _io(0x80)
SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(MemoryRegion))
GET_REGS, SET_REGS = _ior(0x81, ctypes.sizeof(Regs)), _iow(0x82, ctypes.sizeof(Regs))
GET_SREGS, SET_SREGS = _ior(0x83, ctypes.sizeof(Sregs)), _iow(0x84, ctypes.sizeof(Sregs))
GET_FPU, SET_FPU = _ior(0x8C, ctypes.sizeof(Fpu)), _iow(0x8D, ctypes.sizeof(Fpu))
SET_CPUID2, GET_CPUID2 = _iow(0x90, 8), 3 << 30 | 8 << 16 | KVMIO << 8 | 0x91
GET_XCRS, SET_XCRS = _ior(0xA6, ctypes.sizeof(Xcrs)), _iow(0xA7, ctypes.sizeof(Xcrs))
API_VERSION = 12
# KVM_RUN through libc: Python's own ioctl retries on EINTR, which is how the deadline
# gets the vCPU out (the timer signal interrupts it, immediate_exit keeps it out)
_libc = ctypes.CDLL(None, use_errno=True)


@functools.cache
def unusable_reason() -> str | None:
    """Why ``--accel kvm`` cannot run here, or None: no device, no permission, another
    API, or a KVM that does not execute a guest's instructions on the CPU (found by
    running one SSE instruction and one POPCNT as a guest)."""
    if not os.path.exists(DEVICE):
        return f"{DEVICE} does not exist (no KVM on this machine: another OS, a container, or the module not loaded)"
    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        return f"{DEVICE} cannot be opened ({error.strerror}): add this user to the kvm group"
    try:
        version = fcntl.ioctl(fd, GET_API_VERSION)
    finally:
        os.close(fd)
    if version != API_VERSION:
        return f"{DEVICE} speaks KVM API {version}, not {API_VERSION}"
    return _self_test()


SELF_TEST = bytes.fromhex("660ffec1" "f30fb8c3" "b000" "e6f4")   # paddd xmm0, xmm1; popcnt eax, ebx; out 0xf4, 0


def _self_test() -> str | None:
    ram = mmap.mmap(-1, 2 << 20)
    ram[0x1000:0x1018] = struct.pack("<QQQ", 0, 0x00209A0000000000, 0x0000920000000000)
    ram[0x100000 - 0x1000:0x100000 - 0x1000 + len(SELF_TEST)] = SELF_TEST
    machine = KvmMachine(ram, checked=False)
    try:
        machine.set_cpuid([(0, 0, 1, 0, 0, 0)], ())
        machine.boot(0x1000, 0x17, 0x33, 0x600, 0xFF000, 0x1FFFF0, None, 0x1F80)
        how, detail = machine.run(lambda port, value, size: port == 0xF4, lambda port, size: 0,
                                  time.monotonic() + 5)
    finally:
        machine.close()
    if how == "stopped":
        return None
    virtualization = {"vmx", "svm"} & machine_features()
    return (f"{DEVICE} does not run a guest's instructions on this CPU: a test guest's PADDD/POPCNT "
            f"{'crashed' if how == 'crashed' else how} ({detail}); "
            + ("" if virtualization else "the CPU shows neither VMX nor SVM, so this kernel's KVM is a paravirtual one "
               "(such as kvm_pvm) that emulates what it cannot run"))


def page_tables(base: int) -> bytes:
    """PML4, PDPT and four page directories at ``base``: the first 4 GiB identity-mapped
    with 2 MiB pages (1 GiB pages would need PDPE1GB in the guest's CPUID)."""
    pml4 = struct.pack("<Q", base + 0x1000 | PRESENT_WRITABLE).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", base + 0x2000 + 0x1000 * i | PRESENT_WRITABLE) for i in range(4)).ljust(4096, b"\0")
    directories = b"".join(struct.pack("<Q", (i << 21) | PRESENT_WRITABLE | LARGE) for i in range(MAPPED >> 21))
    return pml4 + pdpt + directories


def _segment(selector: int, code: bool) -> Segment:
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3, present=1, dpl=0,
                   db=0 if code else 1, s=1, l=1 if code else 0, g=1)


class KvmMachine:
    """One VM with one vCPU, guest RAM at physical 0 (``ram``: a writable mmap)."""

    def __init__(self, ram: mmap.mmap, checked: bool = True):
        reason = unusable_reason() if checked else None
        if reason:
            raise MinivmmError(f"--accel kvm: {reason}")
        self.ram = ram
        self.kvm = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
        self.vm = fcntl.ioctl(self.kvm, CREATE_VM, 0)
        self._region(0, 0, ram)
        self.tables_at = max(MAPPED, len(ram))
        self.tables = mmap.mmap(-1, 6 * 4096)
        self.tables[:] = page_tables(self.tables_at)
        self._region(PAGE_TABLES_SLOT, self.tables_at, self.tables)
        self.vcpu = fcntl.ioctl(self.vm, CREATE_VCPU, 0)
        size = fcntl.ioctl(self.kvm, GET_VCPU_MMAP_SIZE)
        self.run_area = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.header = RunHeader.from_buffer(self.run_area)

    def _region(self, slot: int, at: int, memory: mmap.mmap) -> None:
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        fcntl.ioctl(self.vm, SET_USER_MEMORY_REGION, MemoryRegion(slot, 0, at, len(memory), address))

    def close(self) -> None:
        del self.header
        self.run_area.close()
        for fd in (self.vcpu, self.vm, self.kvm):
            os.close(fd)

    # -- state ------------------------------------------------------------------------------

    def set_cpuid(self, entries: list[tuple[int, int, int, int, int, int]], indexed) -> None:
        """The guest's CPUID table: (leaf, subleaf, eax, ebx, ecx, edx) each."""
        class Cpuid2(ctypes.Structure):
            _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32), ("entries", CpuidEntry * len(entries))]
        table = Cpuid2(len(entries))
        for k, (leaf, sub, a, b, c, d) in enumerate(entries):
            table.entries[k] = CpuidEntry(leaf, sub, CPUID_FLAG_SIGNIFICANT_INDEX if leaf in indexed else 0, a, b, c, d)
        fcntl.ioctl(self.vcpu, SET_CPUID2, table)

    def boot(self, gdt_base: int, gdt_limit: int, cr0: int, cr4: int, entry: int, rsp: int, xcr0: int | None,
             mxcsr: int) -> None:
        """docs/abi.md's power-on state, in long mode with the identity map."""
        sregs = Sregs()
        fcntl.ioctl(self.vcpu, GET_SREGS, sregs)
        sregs.cs = _segment(0x08, True)
        sregs.ds = sregs.es = sregs.ss = _segment(0x10, False)
        sregs.fs = sregs.gs = _segment(0, False)
        sregs.tr = Segment(base=0, limit=0xFFFF, selector=0, type=11, present=1, s=0)
        sregs.ldt = Segment(unusable=1, type=2, present=0)
        sregs.gdt = DescriptorTable(gdt_base, gdt_limit)
        sregs.idt = DescriptorTable(0, 0)
        sregs.cr0, sregs.cr3, sregs.cr4 = cr0 | CR0_PG, self.tables_at, cr4 | CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
        fcntl.ioctl(self.vcpu, SET_SREGS, sregs)
        if xcr0 is not None:
            xcrs = Xcrs(nr_xcrs=1)
            xcrs.xcrs[0] = Xcr(0, 0, xcr0)
            fcntl.ioctl(self.vcpu, SET_XCRS, xcrs)
        fpu = Fpu()
        fpu.fcw, fpu.mxcsr = 0x37F, mxcsr
        fcntl.ioctl(self.vcpu, SET_FPU, fpu)
        fcntl.ioctl(self.vcpu, SET_REGS, Regs(rsp=rsp, rip=entry, rflags=0x2))

    def cpuid(self, capacity: int = 256) -> dict[tuple[int, int], tuple[int, int, int, int]]:
        """The vCPU's CPUID table as KVM holds it (KVM_GET_CPUID2): what the guest sees."""
        class Cpuid2(ctypes.Structure):
            _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32), ("entries", CpuidEntry * capacity)]
        table = Cpuid2(capacity)
        fcntl.ioctl(self.vcpu, GET_CPUID2, table)
        return {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in table.entries[:table.nent]}

    def regs(self) -> Regs:
        regs = Regs()
        fcntl.ioctl(self.vcpu, GET_REGS, regs)
        return regs

    # -- running ------------------------------------------------------------------------------

    def run(self, on_out, on_in, deadline: float | None) -> tuple[str, int | str]:
        """KVM_RUN until the guest stops: ("stopped", None) when ``on_out(port, value,
        size)`` says so (True), ("halted", rip), ("limit", message) at the deadline,
        ("crashed", why). ``on_in(port, size)`` answers every IN."""
        timer = _Interrupter(self, deadline)
        try:
            while True:
                if _libc.ioctl(self.vcpu, RUN, 0) < 0:
                    error = ctypes.get_errno()
                    if timer.fired:
                        return "limit", None
                    if error == errno.EINTR:
                        continue
                    raise OSError(error, f"KVM_RUN: {os.strerror(error)}")
                reason = self.header.exit_reason
                if timer.fired:
                    return "limit", None
                if reason == EXIT_IO:
                    h = self.header
                    at = h.io_data_offset
                    for k in range(h.io_count):
                        data = bytes(self.run_area[at + k * h.io_size:at + (k + 1) * h.io_size])
                        if h.io_direction == IO_OUT:
                            if on_out(h.io_port, int.from_bytes(data, "little"), h.io_size):
                                return "stopped", None
                        else:
                            self.run_area[at + k * h.io_size:at + (k + 1) * h.io_size] = \
                                on_in(h.io_port, h.io_size).to_bytes(h.io_size, "little")
                    continue
                if reason == EXIT_HLT:
                    return "halted", self.regs().rip
                if reason == EXIT_SHUTDOWN:
                    return "crashed", "triple fault: an exception the guest's IDT could not deliver (KVM_EXIT_SHUTDOWN)"
                if reason == EXIT_MMIO:
                    return "crashed", "access to guest-physical memory beyond RAM (KVM_EXIT_MMIO)"
                if reason == EXIT_INTERNAL_ERROR:
                    suberror = struct.unpack_from("<I", self.run_area, 32)[0]
                    rip = self.regs().rip
                    return "crashed", (f"KVM could not carry out the instruction at {rip:#x} "
                                       f"(KVM_EXIT_INTERNAL_ERROR, suberror {suberror})")
                return "crashed", f"KVM exit reason {reason}"
        finally:
            timer.cancel()


class _Interrupter:
    """The deadline: a timer thread sets immediate_exit and signals the vCPU's thread
    out of KVM_RUN (Documentation/virt/kvm/api.rst, immediate_exit)."""

    def __init__(self, machine: KvmMachine, deadline: float | None):
        self.machine, self.fired, self._done = machine, False, threading.Event()
        self._thread_id = threading.get_ident()
        # a handler that does nothing: the signal's only work is to end KVM_RUN with EINTR
        # (off the main thread no handler can be set, and immediate_exit acts at the next exit)
        self._previous = signal.signal(signal.SIGUSR1, lambda *_: None) \
            if threading.current_thread() is threading.main_thread() else None
        self._timer = None
        if deadline is not None:
            self._timer = threading.Thread(target=self._wait, args=(deadline,), daemon=True)
            self._timer.start()

    def _wait(self, deadline: float) -> None:
        while not self._done.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self.fired = True
                self.machine.header.immediate_exit = 1
                if self._previous is not None:
                    signal.pthread_kill(self._thread_id, signal.SIGUSR1)
                return

    def cancel(self) -> None:
        self._done.set()
        if self._timer is not None:
            self._timer.join()
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
