"""execve, as far as the program can tell (fs/binfmt_elf.c load_elf_binary): the CPU in
user mode with Linux's segments, EFER.SCE on, CR4 and XCR0 as Linux sets them from the
CPU's features (here: the VM's CPUID view), the image mapped with its segments'
protections, its interpreter (PT_INTERP) loaded from the program's file system, and the
initial stack."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import unicorn.x86_const as x86

from ..cpu.features import catalogue
from ..errors import MinivmmError
from ..files import read_bytes
from ..guests.loader import MAX_IMAGE, load_elf
from .cpuinfo import cpuinfo
from .errno import SyscallError
from .kernel import Kernel
from .memory import MMAP_MIN, PAGE, PROT_READ, PROT_WRITE, AddressSpace, page_up
from .process import (AT_BASE, AT_CLKTCK, AT_EGID, AT_ENTRY, AT_EUID, AT_FLAGS, AT_GID, AT_HWCAP, AT_HWCAP2,
                      AT_MINSIGSTKSZ, AT_PAGESZ, AT_PHDR, AT_PHENT, AT_PHNUM, AT_SECURE, AT_UID, DEFAULT_ENV,
                      STACK_SIZE, USER_CS, USER_DS, Process, build_stack, hwcap, hwcap2, min_sigstack)
from .proc import own_trees
from .signals import xsave_layout
from .vfs import MAX_MOUNTS, FileSystem, HostNode, Mount, is_dir

GDT_BASE = 0x1000
# null, kernel code 0x08, kernel data 0x10, (0x18 unused), user32 code 0x23, user data 0x2b,
# user code 0x33: the order syscall/sysret need (arch/x86/include/asm/segment.h).
GDT = struct.pack("<7Q", 0, 0x00209A0000000000, 0x0000920000000000, 0, 0x00CFFA000000FFFF,
                  0x0000F20000000000, 0x0020FA0000000000)
EFER_SCE = 1
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_FSGSBASE, CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 16, 1 << 18
XCR0_X87_SSE, XCR0_AVX, XCR0_AVX512 = 0x3, 0x4, 0xE0
FCW_INIT, MXCSR_INIT = 0x37F, 0x1F80   # arch/x86/kernel/fpu/init.c: every exception masked
ARG_ROOM = STACK_SIZE // 4             # bytes of argv and envp strings and pointers (fs/exec.c)


@dataclass(frozen=True)
class Options:
    """How a Linux program runs: its arguments after its name, environment (None: a small
    fixed one), seed (AT_RANDOM, getrandom, /dev/urandom), mounts, standard input
    (count -> bytes, or None: empty), the machine's clock instead of the virtual one,
    and whether its output is a terminal."""
    argv: tuple = ()
    env: tuple | None = None
    seed: int = 0
    mounts: tuple = field(default=())
    stdin: object = None
    realtime: bool = False
    terminal: bool = False

    @classmethod
    def make(cls, argv=(), env=None, seed=0, mounts=(), stdin=None, realtime=False, terminal=False) -> Options:
        if len(mounts) > MAX_MOUNTS:
            raise MinivmmError(f"{len(mounts)} mounts: at most {MAX_MOUNTS}")
        return cls(tuple(str(a) for a in argv), None if env is None else tuple(env), seed,
                   tuple(m if isinstance(m, Mount) else Mount.parse(m) for m in mounts), stdin, realtime, terminal)


def check_arguments(program: str, strings: list[str]) -> None:
    """Arguments and environment, with a pointer to each, fit in a quarter of the stack
    (fs/exec.c: past it execve fails with E2BIG)."""
    size = sum(len(s.encode("utf-8", "surrogateescape")) + 1 + 8 for s in strings)
    if size > ARG_ROOM:
        raise MinivmmError(f"{program}: its arguments and environment take {size} bytes, more than a quarter "
                           f"of the {STACK_SIZE >> 20} MiB stack (Linux's E2BIG)")


def linux_cr4(view) -> int:
    has = lambda name: view.has(catalogue()[name])  # noqa: E731
    return (CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if has("xsave") else 0)
            | (CR4_FSGSBASE if has("fsgsbase") else 0))


def linux_xcr0(view) -> int:
    """What Linux enables (fpu__init_system_xstate): every state component the CPU has
    that it supports; here x87, SSE, AVX and AVX-512 as the view shows them."""
    has = lambda name: view.has(catalogue()[name])  # noqa: E731
    return XCR0_X87_SSE | (XCR0_AVX if has("avx") else 0) | (XCR0_AVX512 if has("avx512f") else 0)


def map_image(process: Process, image, base: int = 0) -> None:
    """PT_LOAD segments, each a mapping of its file (from its page-aligned offset) with
    its protections; a page two segments share gets both (fs/binfmt_elf.c elf_map)."""
    info = image.linux
    segments = [(address + base, data, size) for address, data, size in image.segments]
    owner: dict[int, tuple[int, int]] = {}   # page -> (first segment on it, protections)
    for i, ((address, _, size), prot) in enumerate(zip(segments, info["prot"])):
        for page in range(address & ~(PAGE - 1), page_up(address + size), PAGE):
            first, had = owner.get(page, (i, 0))
            owner[page] = (first, had | prot)
    runs: list[list[int]] = []
    for page in sorted(owner):
        if runs and runs[-1][1] == page and (runs[-1][2], runs[-1][3]) == owner[page]:
            runs[-1][1] += PAGE
        else:
            runs.append([page, page + PAGE, *owner[page]])
    for start, end, i, prot in runs:
        offset = (info["offset"][i] & ~(PAGE - 1)) + start - (segments[i][0] & ~(PAGE - 1))
        process.memory.map(start, end - start, prot, info["exe"], offset)
    for address, data, _ in segments:
        process.fill(address, data)


def load_interpreter(fs, path: str, program: str):
    """The dynamic loader named by PT_INTERP, read from the program's file system."""
    try:
        _, node = fs.resolve(path)
    except SyscallError as e:
        raise MinivmmError(f"{program}: its interpreter {path} is not in the program's file system "
                           f"(error {e.errno}): mount it, e.g. --mount / to see this machine's libraries") from None
    if is_dir(node) or not isinstance(node, HostNode):
        raise MinivmmError(f"{program}: its interpreter {path} is not a regular file")
    image = load_elf(read_bytes(node.host, "interpreter", MAX_IMAGE), path, node.host, linux=True, base=0)
    if image.linux["interp"] or not image.linux["dynamic"]:
        raise MinivmmError(f"{program}: its interpreter {path} is not a shared object (ld.so is ET_DYN "
                           f"without an interpreter of its own)")
    return image


def execve(uc, ram, image, host, view, options: Options, write_xcr0, console) -> Kernel:
    """A new process of ``image`` and the kernel that serves it; ``console`` gets what
    it writes to standard output."""
    fs = FileSystem(list(options.mounts), {})
    process = start_process(uc, ram, image, view, options, write_xcr0, fs)
    process.stdout_sink = console
    process.argv = [image.linux["execfn"], *options.argv]
    fs.own = own_trees(process, cpuinfo(host, view))
    kernel = Kernel(process, fs, options.seed, options.stdin, options.realtime, options.terminal, xsave_layout(view))
    kernel.cwd = visible_directory(fs, os.getcwd())
    return kernel


def visible_directory(fs, path: str) -> str:
    """The program starts where the command runs when the mounts show that directory
    (as qemu-user does), else at the root."""
    try:
        canonical, node = fs.resolve(path)
    except SyscallError:
        return "/"
    return canonical if is_dir(node) else "/"


def start_process(uc, ram, image, view, options: Options, write_xcr0, fs) -> Process:
    info = image.linux
    interpreter = load_interpreter(fs, info["interp"], image.name) if info["interp"] else None
    ram[GDT_BASE:GDT_BASE + len(GDT)] = GDT
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, GDT_BASE, len(GDT) - 1, 0))
    uc.reg_write(x86.UC_X86_REG_CR0, 0x33)
    uc.reg_write(x86.UC_X86_REG_CR4, linux_cr4(view))
    uc.reg_write(x86.UC_X86_REG_MSR, (0xC0000080, uc.reg_read(x86.UC_X86_REG_MSR, 0xC0000080) | EFER_SCE))
    if linux_cr4(view) & CR4_OSXSAVE:
        try:
            write_xcr0(linux_xcr0(view))
        except Exception:  # the engine model refuses the wider state: what it can hold
            write_xcr0(XCR0_X87_SSE)
    end = page_up(max(address + size for address, _, size in image.segments))
    stack_top = len(ram) - PAGE
    stack_bottom = stack_top - STACK_SIZE
    process = Process(AddressSpace(ram), end, end, stack_bottom - PAGE, stack_bottom, info["exe"])
    if min(address for address, _, _ in image.segments) < MMAP_MIN or end > stack_bottom - PAGE:
        raise MinivmmError(f"{image.name}: its segments do not fit between {MMAP_MIN:#x} and the stack "
                           f"({len(ram) >> 20} MiB of RAM; raise --memory)")
    map_image(process, image)
    process.memory.map(stack_bottom, STACK_SIZE, PROT_READ | PROT_WRITE, "[stack]")
    base, entry = 0, image.entry
    if interpreter:
        extent = page_up(max(address + size for address, _, size in interpreter.segments))
        base = process.memory.find_free(extent, process.mmap_top, end + PAGE)
        map_image(process, interpreter, base)
        entry = base + interpreter.entry
    auxv = [(AT_PHDR, info["phdr"]), (AT_PHENT, 56), (AT_PHNUM, info["phnum"]), (AT_PAGESZ, PAGE),
            (AT_BASE, base), (AT_FLAGS, 0), (AT_ENTRY, image.entry), (AT_UID, 1000), (AT_EUID, 1000),
            (AT_GID, 1000), (AT_EGID, 1000), (AT_HWCAP, hwcap(view)), (AT_HWCAP2, hwcap2(view)),
            (AT_CLKTCK, 100), (AT_SECURE, 0), (AT_MINSIGSTKSZ, min_sigstack(view))]
    env = list(options.env if options.env is not None else DEFAULT_ENV)
    check_arguments(image.name, [info["execfn"], *options.argv, *env])
    rsp = build_stack(process, stack_top, [info["execfn"], *options.argv], env, auxv, options.seed, info["execfn"])
    for reg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES, x86.UC_X86_REG_SS):
        uc.reg_write(reg, USER_DS)
    uc.reg_write(x86.UC_X86_REG_CS, USER_CS)
    uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x202)
    uc.reg_write(x86.UC_X86_REG_FPCW, FCW_INIT)   # as fpstate_init gives a new process
    uc.reg_write(x86.UC_X86_REG_MXCSR, MXCSR_INIT)
    uc.reg_write(x86.UC_X86_REG_RSP, rsp)
    uc.reg_write(x86.UC_X86_REG_RIP, entry)
    return process
