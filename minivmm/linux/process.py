"""A Linux process: its address space (image, brk, mmap area, stack), its file
descriptors, and what the kernel hands it at execve (the stack of argc, argv, envp and
the auxiliary vector; fs/binfmt_elf.c create_elf_tables)."""

from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import dataclass, field, replace

from ..cpu.features import catalogue
from .errno import ENAMETOOLONG, SyscallError
from .memory import PAGE, PROT_READ, PROT_WRITE, AddressSpace

STACK_SIZE = 8 << 20              # RLIMIT_STACK's default
USER_CS, USER_DS = 0x33, 0x2B     # Linux's __USER_CS and __USER_DS (arch/x86/include/asm/segment.h)

# auxv keys (include/uapi/linux/auxvec.h, arch/x86/include/uapi/asm/auxvec.h)
AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN, AT_SYSINFO_EHDR, AT_MINSIGSTKSZ = 23, 25, 26, 31, 33, 51

SAMPLE = 10_000                   # system calls kept in order in the report
DEFAULT_ENV = ("PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/", "LANG=C", "TERM=dumb")

# The XSAVE state components and the CPUID feature each needs (arch/x86/kernel/fpu/xstate.c,
# xsave_cpuid_features), of those Linux supports for user mode (XFEATURE_MASK_USER_SUPPORTED):
# x87, SSE, AVX, MPX's two, AVX-512's three, PKRU, AMX's tile configuration and data. (APX's,
# since 6.16, is not in the catalogue.)
XSTATE_FEATURES = {0: "fpu", 1: "sse", 2: "avx", 3: "mpx", 4: "mpx", 5: "avx512f", 6: "avx512f", 7: "avx512f",
                   9: "pku", 17: "amx_tile", 18: "amx_tile"}
XFEATURES_LEGACY = 0x3          # x87 and SSE, which FXSAVE holds
XFEATURES_DYNAMIC = 1 << 18     # AMX's tile data: in use only once asked for (XFD, ARCH_REQ_XCOMP_PERM)


@dataclass
class Process:
    """The kernel's side of one program, kept by the VMM (it survives migrations)."""
    memory: AddressSpace              # its mappings over guest RAM (linear = physical)
    brk_start: int
    brk: int
    mmap_top: int                     # mmap hands out pages top-down below here
    stack_bottom: int
    exe: str                          # the program's path (/proc/self/exe)
    stdout_sink: object = None        # bytes -> None: the run's console
    stderr: bytearray = field(default_factory=bytearray)
    stderr_left_out: int = 0
    counts: Counter = field(default_factory=Counter)      # system calls by name
    unknown: Counter = field(default_factory=Counter)     # unknown ones by number (the first 1000 numbers)
    unknown_others: int = 0                               # calls of further unknown numbers
    sample: list = field(default_factory=list)            # the first SAMPLE calls, in order
    exit_status: int | None = None
    tid: int = 1000
    auxv: bytes = b""                 # as on the initial stack: /proc/self/auxv
    argv: list = field(default_factory=list)                # /proc/self/cmdline
    comm: bytes | None = None         # PR_SET_NAME's (None: the program file's name, as execve sets it)
    # The XSAVE features Linux supports on the VM's CPU (ARCH_GET_XCOMP_SUPP; the VMM sets
    # it from the view), and those the process may use (ARCH_GET_XCOMP_PERM), for itself
    # and for the guests a VMM in it would run (None until the VMM sets them: xcomp_perms).
    xfeatures: int = XFEATURES_LEGACY
    xcomp_perm: int | None = None
    xcomp_guest_perm: int | None = None
    copied: int = 0                   # bytes the kernel copied from and to its memory: their time (clock.py)
    ppid: int = 1                     # its parent (outside the VM: 1)
    pgid: int | None = None           # its process group and session (None: led by itself)
    sid: int | None = None
    status: int | None = None         # its end as wait4 reports it (exit code << 8, or the signal)
    execs: int = 0                    # execve calls it made

    def forked(self, tid: int) -> Process:
        """fork's copy: the mappings (its memory the VMM copies), the heap, the
        statistics (counted over the VM's processes); its own id, this process its parent."""
        memory = AddressSpace(self.memory.ram)
        memory.restore(self.memory.state())
        return replace(self, memory=memory, tid=tid, ppid=self.tid, pgid=self.group, sid=self.session,
                       exit_status=None, status=None)

    @property
    def group(self) -> int:
        return self.pgid if self.pgid is not None else self.tid

    @property
    def session(self) -> int:
        return self.sid if self.sid is not None else self.tid

    def name(self) -> bytes:
        """comm: at most 15 bytes (TASK_COMM_LEN 16 with its NUL)."""
        return (self.comm if self.comm is not None else self.exe.rsplit("/", 1)[-1].encode("utf-8", "replace"))[:15]

    def aux(self, key: int) -> int | None:
        """An entry of the auxiliary vector execve gave it."""
        words = struct.unpack(f"<{len(self.auxv) // 8}Q", self.auxv)
        return dict(zip(words[::2], words[1::2])).get(key)

    @property
    def ram(self):
        return self.memory.ram

    # -- guest memory as the kernel touches it: EFAULT where the program could not --------

    def read(self, address: int, size: int) -> bytes:
        self.memory.check(address, size, PROT_READ)
        self.copied += size
        return bytes(self.ram[address:address + size])

    def write(self, address: int, data: bytes) -> None:
        self.memory.check(address, len(data), PROT_WRITE)
        self.copied += len(data)
        self.fill(address, data)

    def fill(self, address: int, data) -> None:
        """Write whatever the protections (the loader, a file mapping's contents)."""
        self.ram[address:address + len(data)] = data
        self.memory.written(address, len(data))

    def read_string(self, address: int, limit: int = 4096) -> bytes:
        out = bytearray()
        while len(out) < limit:
            at = address + len(out)
            chunk = self.read(at, min(256, PAGE - at % PAGE))
            end = chunk.find(b"\0")
            if end >= 0:
                return bytes(out + chunk[:end])
            out += chunk
        raise SyscallError(ENAMETOOLONG)


def hwcap(view) -> int:
    """AT_HWCAP on x86 is CPUID.1:EDX (arch/x86/include/asm/elf.h, ELF_HWCAP)."""
    return view.answer(1, 0, 0)[3]


def hwcap2(view) -> int:
    """AT_HWCAP2: bit 1 FSGSBASE, which Linux enables whenever the CPU has it."""
    return 2 if view.has(catalogue()["fsgsbase"]) else 0


def xfeatures(view) -> tuple[int, int]:
    """The XSAVE features Linux enables on the view (fpu__init_system_xstate): those
    CPUID.(0DH,0) lists whose feature the view has, the dynamic one only with XFD; and
    those a new process may use (fpstate_reset: all but the dynamic). Without XSAVE, x87
    and SSE (fpu_user_cfg.legacy_features), and no permission at all."""
    has = lambda name: view.has(catalogue()[name])  # noqa: E731
    if not has("xsave") or not view.table.in_range(0xD):
        return XFEATURES_LEGACY, 0
    eax, _, _, edx = view.answer(0xD, 0, 0)
    listed = eax | edx << 32
    supported = sum(1 << i for i, feature in XSTATE_FEATURES.items() if listed >> i & 1 and has(feature))
    if not has("xfd"):
        supported &= ~XFEATURES_DYNAMIC
    if supported & XFEATURES_LEGACY != XFEATURES_LEGACY:   # no FP/SSE state: XSAVE is not used
        return XFEATURES_LEGACY, 0
    return supported, supported & ~XFEATURES_DYNAMIC


def min_sigstack(view) -> int:
    """AT_MINSIGSTKSZ: the signal frame with the XSAVE area of what XCR0 enables
    (arch/x86/kernel/signal.c get_sigframe_size): CPUID.0xD.0:EBX plus the frame."""
    xsave = view.answer(0xD, 0, 0)[1] if view.has(catalogue()["xsave"]) else 512
    return xsave + 8 + 440 + 128  # fpstate magic, ucontext and siginfo, redzone-aligned


def build_stack(process: Process, top: int, argv: list[str], env: list[str], auxv: list[tuple[int, int]],
                seed: int, execfn: str) -> int:
    """Write the initial stack below ``top`` as Linux lays it out, and return RSP:
    argc, argv[], NULL, envp[], NULL, auxv pairs, AT_NULL; above them the strings,
    "x86_64" and the 16 AT_RANDOM bytes (fs/binfmt_elf.c create_elf_tables)."""
    at = top
    def push_bytes(data: bytes) -> int:
        nonlocal at
        at -= len(data)
        process.write(at, data)
        return at

    execfn_at = push_bytes(execfn.encode() + b"\0")
    string_at = [push_bytes(s.encode() + b"\0") for s in [*argv, *env]]
    platform_at = push_bytes(b"x86_64\0")
    random_at = push_bytes(random.Random(seed).randbytes(16))
    at &= ~0xF
    vector = dict(auxv)
    vector.update({AT_RANDOM: random_at, AT_PLATFORM: platform_at, AT_EXECFN: execfn_at})
    words = [len(argv), *string_at[:len(argv)], 0, *string_at[len(argv):], 0]
    for key, value in vector.items():
        words += [key, value]
    words += [AT_NULL, 0]
    process.auxv = struct.pack(f"<{len(vector) * 2 + 2}Q", *words[len(words) - len(vector) * 2 - 2:])
    if len(words) % 2:
        words.append(0)  # RSP 16-byte aligned at the entry point, as the ABI says
    at -= 8 * len(words)
    process.write(at, struct.pack(f"<{len(words)}Q", *words))
    return at
