"""The vDSO (arch/x86/entry/vdso/): a shared object the kernel maps into every program,
where the C library finds clock_gettime, gettimeofday, time, clock_getres and getcpu
(AT_SYSINFO_EHDR gives its address) and calls them without a system call.

minivmm maps one page of data, ``[vvar]``, and the image after it, ``[vdso]``, as
map_vdso does. The image is built here: an ELF shared object linked at 0, with the
symbols and the symbol version (LINUX_2.6) of the kernel's, so that glibc (dl_vdso_vsym)
and musl (__vdsosym) find them. Its functions read virtual time from ``[vvar]``:

- the time since boot, which the engine's block counter stores there at the start
  of every block it runs (engine.py), so that reading the clock costs no exit;
- the wall clock less the time since boot, the mode, and the CPU getcpu answers.

The time is one word, written between blocks: a reader needs no sequence count. In
mode 0 (realtime: the machine's clock) every function but getcpu makes the system
call instead, as Linux's does when no clock source is readable in user mode
(VDSO_CLOCKMODE_NONE). Clocks the vDSO does not answer (the CPU-time clocks, dynamic
ones) make the system call too, as Linux's do."""

from __future__ import annotations

import ctypes
import functools
import struct

from .memory import PROT_EXEC, PROT_READ

PAGE = 0x1000
SONAME = b"linux-vdso.so.1"
VERSION = b"LINUX_2.6"


class Vvar(ctypes.Structure):
    """What ``[vvar]`` holds, at its start."""
    _fields_ = (("since_boot_ns", ctypes.c_uint64),   # live: the engine's block counter stores it
                ("wall_ns", ctypes.c_uint64),         # the wall clock less the time since boot
                ("mode", ctypes.c_uint32),            # 1: virtual time, answered here; 0: system calls
                ("cpu", ctypes.c_uint32))             # what getcpu answers


WALL_CLOCKS = 1 << 0 | 1 << 5 | 1 << 8 | 1 << 11     # clock.py's WALL
SINCE_BOOT_CLOCKS = 1 << 1 | 1 << 4 | 1 << 6 | 1 << 7 | 1 << 9   # clock.py's SINCE_BOOT
COARSE_CLOCKS = 1 << 5 | 1 << 6                                  # clock.py's COARSE
SYS_GETTIMEOFDAY, SYS_TIME, SYS_CLOCK_GETTIME, SYS_CLOCK_GETRES = 96, 201, 228, 229

# Each function finds [vvar] one page below the page it runs in (the image's code lies in
# its first page), reads the time into RAX, and leaves the rest to the C library's ABI:
# leaf functions, no stack, RCX, RDX, R8-R11 clobbered.
_VVAR = "lea r8, [rip]; and r8, -4096; sub r8, 4096"
_NOW = "mov rax, qword ptr [r8]"          # the time since boot
CODE = {
    # int clock_gettime(clockid_t, struct timespec *)
    "clock_gettime": f"""
        {_VVAR}
        cmp dword ptr [r8 + 16], 0; je l9
        cmp edi, 11; ja l9
        mov eax, 1; mov ecx, edi; shl eax, cl
        test eax, {SINCE_BOOT_CLOCKS}; jnz l1
        test eax, {WALL_CLOCKS}; jz l9
        {_NOW}; add rax, qword ptr [r8 + 8]; jmp l2
    l1:  {_NOW}
    l2:  xor edx, edx; mov ecx, 1000000000; div rcx
        mov qword ptr [rsi], rax; mov qword ptr [rsi + 8], rdx
        xor eax, eax; ret
    l9:  mov eax, {SYS_CLOCK_GETTIME}; syscall; ret""",
    # int gettimeofday(struct timeval *, struct timezone *): the timezone is sys_tz's, zero
    "gettimeofday": f"""
        {_VVAR}
        cmp dword ptr [r8 + 16], 0; je l9
        test rdi, rdi; jz l1
        {_NOW}; add rax, qword ptr [r8 + 8]
        xor edx, edx; mov ecx, 1000000000; div rcx
        mov qword ptr [rdi], rax; mov rax, rdx
        xor edx, edx; mov ecx, 1000; div rcx
        mov qword ptr [rdi + 8], rax
    l1:  test rsi, rsi; jz l2
        mov qword ptr [rsi], 0
    l2:  xor eax, eax; ret
    l9:  mov eax, {SYS_GETTIMEOFDAY}; syscall; ret""",
    # time_t time(time_t *)
    "time": f"""
        {_VVAR}
        cmp dword ptr [r8 + 16], 0; je l9
        {_NOW}; add rax, qword ptr [r8 + 8]
        xor edx, edx; mov ecx, 1000000000; div rcx
        test rdi, rdi; jz l1
        mov qword ptr [rdi], rax
    l1:  ret
    l9:  mov eax, {SYS_TIME}; syscall; ret""",
    # int clock_getres(clockid_t, struct timespec *): 1 ns, as the system call answers,
    # for all but the coarse clocks (the tick: the system call answers)
    "clock_getres": f"""
        {_VVAR}
        cmp dword ptr [r8 + 16], 0; je l9
        cmp edi, 11; ja l9
        mov eax, 1; mov ecx, edi; shl eax, cl
        test eax, {(SINCE_BOOT_CLOCKS | WALL_CLOCKS) & ~COARSE_CLOCKS}; jz l9
        test rsi, rsi; jz l1
        mov qword ptr [rsi], 0; mov qword ptr [rsi + 8], 1
    l1:  xor eax, eax; ret
    l9:  mov eax, {SYS_CLOCK_GETRES}; syscall; ret""",
    # long getcpu(unsigned *cpu, unsigned *node, void *cache)
    "getcpu": f"""
        {_VVAR}
        test rdi, rdi; jz l1
        mov eax, dword ptr [r8 + 20]; mov dword ptr [rdi], eax
    l1:  test rsi, rsi; jz l2
        mov dword ptr [rsi], 0
    l2:  xor eax, eax; ret""",
}

# ELF constants (include/uapi/linux/elf.h)
ET_DYN, EM_X86_64, PT_LOAD, PT_DYNAMIC = 3, 62, 1, 2
PF_X, PF_R = 1, 4
DT_NULL, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME = 0, 4, 5, 6, 10, 11, 14
DT_VERSYM, DT_VERDEF, DT_VERDEFNUM = 0x6FFFFFF0, 0x6FFFFFFC, 0x6FFFFFFD
DYNAMIC = (DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME, DT_VERSYM, DT_VERDEF, DT_VERDEFNUM, DT_NULL)
STB_GLOBAL, STB_WEAK, STT_FUNC = 1, 2, 2
SHT_PROGBITS, SHT_STRTAB, SHT_DYNAMIC, SHT_HASH, SHT_DYNSYM = 1, 3, 6, 5, 11
SHT_GNU_VERDEF, SHT_GNU_VERSYM = 0x6FFFFFFD, 0x6FFFFFFF
SHF_ALLOC, SHF_EXECINSTR = 2, 4
VER_FLG_BASE = 1
TEXT_INDEX = 7          # the section header of .text (the symbols' st_shndx)


def elf_hash(name: bytes) -> int:
    """The System V ABI's symbol hash (DT_HASH, and a version's vd_hash)."""
    h = 0
    for byte in name:
        h = (h << 4) + byte
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g
    return h


class _Strings:
    def __init__(self):
        self.data = b"\0"
        self.at: dict[bytes, int] = {}

    def add(self, name: bytes) -> int:
        if name not in self.at:
            self.at[name] = len(self.data)
            self.data += name + b"\0"
        return self.at[name]


def _assemble(text_at: int) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The functions' code placed at ``text_at``, and each one's address and size."""
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    code, where = b"", {}
    for name, source in CODE.items():
        encoding, _ = ks.asm(source.replace("\n", ";"), text_at + len(code))
        where[name] = (text_at + len(code), len(encoding))
        code += bytes(encoding)
        code += b"\xcc" * (-len(code) % 16)   # each function 16-byte aligned, INT3 between
    return code, where


@functools.cache
def image() -> bytes:
    """The vDSO's ELF image (at most a page: its code must lie in its first page)."""
    names = list(CODE)
    dynstr = _Strings()
    soname, version = dynstr.add(SONAME), dynstr.add(VERSION)
    # every function as __vdso_<name> and as <name> (weak), as the kernel's vdso.lds exports them
    symbols = [(b"__vdso_" + n.encode(), STB_GLOBAL, n) for n in names] + [(n.encode(), STB_WEAK, n) for n in names]
    name_at = [dynstr.add(s[0]) for s in symbols]
    count = len(symbols) + 1
    nbucket = 3
    buckets, chains = [0] * nbucket, [0] * count
    for index, (name, _, _) in enumerate(symbols, 1):
        bucket = elf_hash(name) % nbucket
        chains[index], buckets[bucket] = buckets[bucket], index
    hash_table = struct.pack(f"<{2 + nbucket + count}I", nbucket, count, *buckets, *chains)
    versym = struct.pack(f"<{count}H", 0, *[2] * len(symbols))
    # two definitions: the object itself (its soname, VER_FLG_BASE) and LINUX_2.6
    verdef = b""
    for index, (flags, name, string) in enumerate(((VER_FLG_BASE, SONAME, soname), (0, VERSION, version)), 1):
        next_at = 28 if index == 1 else 0
        verdef += struct.pack("<HHHHIII", 1, flags, index, 1, elf_hash(name), 20, next_at)
        verdef += struct.pack("<II", string, 0)
    shstr = _Strings()
    sections = []   # (name, type, flags, data, link, info, align, entsize)
    layout = [(".hash", SHT_HASH, hash_table, 2, 8, 4), (".dynsym", SHT_DYNSYM, None, 3, 8, 24),
              (".dynstr", SHT_STRTAB, dynstr.data, 0, 1, 0), (".gnu.version", SHT_GNU_VERSYM, versym, 2, 2, 2),
              (".gnu.version_d", SHT_GNU_VERDEF, verdef, 3, 8, 0), (".dynamic", SHT_DYNAMIC, None, 3, 8, 16),
              (".text", SHT_PROGBITS, None, 0, 16, 0)]
    phdrs_at, phnum = 64, 2
    offset = phdrs_at + 56 * phnum
    placed = {}
    for name, kind, data, link, align, entsize in layout:
        offset += -offset % align
        size = {".dynsym": 24 * count, ".dynamic": 16 * len(DYNAMIC)}.get(name, len(data) if data is not None else 0)
        placed[name] = offset
        if name != ".text":
            offset += size
    text, where = _assemble(placed[".text"])
    dynsym = bytes(24)
    for (_, bind, function), at in zip(symbols, name_at):
        dynsym += struct.pack("<IBBHQQ", at, bind << 4 | STT_FUNC, 0, TEXT_INDEX, *where[function])
    values = {DT_HASH: placed[".hash"], DT_STRTAB: placed[".dynstr"], DT_SYMTAB: placed[".dynsym"],
              DT_STRSZ: len(dynstr.data), DT_SYMENT: 24, DT_SONAME: soname, DT_VERSYM: placed[".gnu.version"],
              DT_VERDEF: placed[".gnu.version_d"], DT_VERDEFNUM: 2, DT_NULL: 0}
    dynamic = b"".join(struct.pack("<qQ", tag, values[tag]) for tag in DYNAMIC)
    contents = {".dynsym": dynsym, ".dynamic": dynamic, ".text": text}
    body = bytearray(placed[".text"] + len(text))
    for name, kind, data, link, align, entsize in layout:
        data = contents.get(name, data)
        body[placed[name]:placed[name] + len(data)] = data
        info = {".dynsym": 1, ".gnu.version_d": 2}.get(name, 0)   # local symbols; definitions
        sections.append((shstr.add(name.encode()), kind, SHF_ALLOC | (SHF_EXECINSTR if name == ".text" else 0),
                         placed[name], len(data), link, info, align, entsize))
    names_at = len(body)
    shstrtab_name = shstr.add(b".shstrtab")
    body += shstr.data
    body += bytes(-len(body) % 8)
    shoff = len(body)
    headers = [bytes(64)]
    for name, kind, flags, at, size, link, info, align, entsize in sections:
        headers.append(struct.pack("<IIQQQQIIQQ", name, kind, flags, at, at, size, link, info, align, entsize))
    headers.append(struct.pack("<IIQQQQIIQQ", shstrtab_name, SHT_STRTAB, 0, 0, names_at, len(shstr.data), 0, 0, 1, 0))
    body += b"".join(headers)
    loaded = len(body)   # the whole file, section headers too, as the kernel's image
    if loaded > PAGE:
        raise AssertionError(f"the vDSO's image takes {loaded} bytes, more than a page")
    ident = b"\x7fELF" + bytes((2, 1, 1, 0)) + bytes(8)
    body[:64] = ident + struct.pack("<HHIQQQIHHHHHH", ET_DYN, EM_X86_64, 1, where["clock_gettime"][0], phdrs_at,
                                    shoff, 0, 64, 56, phnum, 64, len(headers), len(headers) - 1)
    body[phdrs_at:phdrs_at + 56 * phnum] = (
        struct.pack("<IIQQQQQQ", PT_LOAD, PF_R | PF_X, 0, 0, 0, loaded, loaded, PAGE)
        + struct.pack("<IIQQQQQQ", PT_DYNAMIC, PF_R, placed[".dynamic"], placed[".dynamic"], placed[".dynamic"],
                      len(dynamic), len(dynamic), 8))
    return bytes(body)


def map_into(process, top: int, bottom: int) -> int:
    """``[vvar]`` and ``[vdso]`` in the process's free pages below ``top`` and above
    ``bottom``, top-down as get_unmapped_area places them (map_vdso); the vDSO's
    address, for AT_SYSINFO_EHDR."""
    memory = process.memory
    vvar = memory.find_free(2 * PAGE, top, bottom)
    memory.map(vvar, PAGE, PROT_READ, "[vvar]")
    memory.map(vvar + PAGE, PAGE, PROT_READ | PROT_EXEC, "[vdso]")
    process.fill(vvar + PAGE, image())
    return vvar + PAGE


def publish(ram, vvar: int, realtime: bool, wall_ns: int) -> Vvar:
    """Write what ``[vvar]`` holds but the time (the VMM's, at each start of a program,
    restore or migration); the structure over it, whose first word the block counter
    is to store the time since boot in (engine.set_time_store)."""
    data = Vvar.from_buffer(ram, vvar)
    data.wall_ns, data.mode, data.cpu = wall_ns & ((1 << 64) - 1), 0 if realtime else 1, 0
    return data
