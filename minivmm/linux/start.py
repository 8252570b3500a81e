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
from .binfmt import MAX_REWRITES, Program, find_program, fits, load_program, read_interpreter
from .binfmt import ARG_ROOM, arguments_size
from .clock import boot_epoch
from .cpuinfo import cpuinfo
from .errno import EACCES, ELOOP, ENOENT, ENOEXEC, SyscallError
from .kernel import Kernel
from .memory import MMAP_MIN, AddressSpace
from .process import DEFAULT_ENV, STACK_SIZE, USER_CS, USER_DS, Process
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
    """Arguments and environment fit in a quarter of the stack (Linux's E2BIG)."""
    size = arguments_size(strings)
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


def load_interpreter(fs, cwd: str, path: str, program: str):
    """The dynamic loader named by PT_INTERP, read from the program's file system, as
    execve reads it (:func:`minivmm.linux.binfmt.read_interpreter`)."""
    try:
        return read_interpreter(fs, cwd, path)
    except SyscallError as e:
        if e.errno == ENOENT:
            raise MinivmmError(f"{program}: its interpreter {path} is not in the program's file system: mount "
                               f"it, e.g. --mount / to see this machine's libraries") from None
        raise MinivmmError(f"{program}: its interpreter {path} cannot run ({os.strerror(e.errno)}): it must be "
                           f"an executable ELF shared object without an interpreter of its own") from None


def run_script(fs, cwd: str, image, argv: list[str]) -> Program:
    """The program a ``#!`` script minivmm was given runs (fs/binfmt_script.c): its
    interpreter reads the script by its path in the program's file system, so the
    script must be there; nested scripts and the interpreter as execve finds them."""
    filename = visible_as(fs, cwd, image.name, image.path)
    if filename is None:
        folder = os.path.dirname(os.path.abspath(image.path))
        raise MinivmmError(f"{image.name}: a #! script is read by its interpreter from the program's file "
                           f"system, which does not show it: mount it, e.g. --mount {folder}")
    try:
        return find_program(fs, cwd, filename, argv)
    except SyscallError as e:
        why = {ENOENT: "a file its #! lines name is not in the program's file system: mount it, e.g. --mount /",
               EACCES: "it, or a file its #! lines name, is not executable (EACCES)",
               ENOEXEC: "a #! line names no interpreter, or one that is neither ELF nor a script (ENOEXEC)",
               ELOOP: f"more than {MAX_REWRITES} #! scripts in a row (ELOOP)"}
        raise MinivmmError(f"{image.name}: cannot run it as Linux would: "
                           f"{why.get(e.errno, os.strerror(e.errno))}") from None


def visible_as(fs, cwd: str, name: str, host_path: str) -> str | None:
    """The path at which the program's file system shows the machine's file
    ``host_path``: as it was named, else under the mount that holds it; None if none."""
    target = os.stat(host_path)
    candidates = [name]
    for mount in fs.mounts:
        inside = os.path.relpath(os.path.abspath(host_path), mount.host)
        if inside != ".." and not inside.startswith("../"):
            candidates.append(mount.guest if inside == "." else mount.guest.rstrip("/") + "/" + inside)
    for candidate in candidates:
        try:
            _, node = fs.resolve(candidate, cwd)
        except SyscallError:
            continue
        if isinstance(node, HostNode) and os.path.samestat(node.stat, target):
            return candidate
    return None


def execve(uc, ram, image, host, view, options: Options, write_xcr0, console) -> Kernel:
    """A new process of ``image`` and the kernel that serves it; ``console`` gets what
    it writes to standard output."""
    fs = FileSystem(list(options.mounts), {})
    cwd = visible_directory(fs, os.getcwd())
    argv = [image.linux["execfn"], *options.argv]
    if image.linux.get("script"):
        program = run_script(fs, cwd, image, argv)
    else:
        interp = image.linux["interp"]
        program = Program(image, load_interpreter(fs, cwd, interp, image.name) if interp else None, argv,
                          image.linux["execfn"])
    process = start_process(uc, ram, program, view, options, write_xcr0)
    process.stdout_sink = console
    fs.own = own_trees(process, cpuinfo(host, view))
    kernel = Kernel(process, fs, options.seed, options.stdin, options.realtime, options.terminal, xsave_layout(view),
                    boot_epoch([image.path, *(mount.host for mount in options.mounts)]))
    kernel.cwd, kernel.view = cwd, view
    return kernel


def visible_directory(fs, path: str) -> str:
    """The program starts where the command runs when the mounts show that directory
    (as qemu-user does), else at the root."""
    try:
        canonical, node = fs.resolve(path)
    except SyscallError:
        return "/"
    return canonical if is_dir(node) else "/"


def start_process(uc, ram, program: Program, view, options: Options, write_xcr0) -> Process:
    """The CPU as Linux hands it to a new process, and the program loaded."""
    image = program.image
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
    if not fits(program, len(ram)):
        raise MinivmmError(f"{image.name}: its segments do not fit between {MMAP_MIN:#x} and the stack "
                           f"({len(ram) >> 20} MiB of RAM; raise --memory)")
    env = list(options.env if options.env is not None else DEFAULT_ENV)
    check_arguments(image.name, [program.filename, *program.argv, *env])
    process = Process(AddressSpace(ram), 0, 0, 0, 0, image.linux["exe"])
    uc.reg_write(x86.UC_X86_REG_SS, USER_DS)
    uc.reg_write(x86.UC_X86_REG_CS, USER_CS)
    uc.reg_write(x86.UC_X86_REG_FPCW, FCW_INIT)   # as fpstate_init gives a new process
    uc.reg_write(x86.UC_X86_REG_FPTAG, 0xFFFF)     # every register empty (the engine starts them valid)
    uc.reg_write(x86.UC_X86_REG_MXCSR, MXCSR_INIT)
    load_program(uc, process, program, env, options.seed, view)
    return process
