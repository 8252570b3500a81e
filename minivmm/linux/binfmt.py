"""What an execve runs, and how it is loaded (fs/exec.c, fs/binfmt_script.c,
fs/binfmt_elf.c): the file as open_exec opens it from the program's file system, a
``#!`` script's interpreter in its place (as deep as exec_binprm lets scripts nest),
then the ELF image and the interpreter its PT_INTERP names. Every failure is the errno
Linux returns, found before anything of the process changes. Then load_elf_binary's
work: the segments mapped, the interpreter, the stack with argv, envp and the
auxiliary vector, the registers start_thread sets. The first program and every later
execve load the same way."""

from __future__ import annotations

import itertools
import os
import stat as st
from dataclasses import dataclass, replace

import unicorn.x86_const as x86

from ..errors import MinivmmError
from ..guests.loader import MAX_IMAGE, GuestImage, load_elf
from . import vdso
from .errno import EACCES, ELIBBAD, ELOOP, ENOEXEC, ENOMEM, SyscallError
from .files import HostFile
from .memory import MMAP_MIN, PAGE, PROT_READ, PROT_WRITE, page_up
from .process import (AT_BASE, AT_CLKTCK, AT_EGID, AT_ENTRY, AT_EUID, AT_FLAGS, AT_GID, AT_HWCAP, AT_HWCAP2,
                      AT_MINSIGSTKSZ, AT_PAGESZ, AT_PHDR, AT_PHENT, AT_PHNUM, AT_SECURE, AT_SYSINFO_EHDR, AT_UID,
                      STACK_SIZE, USER_DS, Process, build_stack, hwcap, hwcap2, min_sigstack)
from .vfs import HostNode

BINPRM_BUF_SIZE = 256      # include/linux/binfmts.h: what a binary format sees of the file's start
MAX_REWRITES = 5           # exec_binprm: "if (depth > 5) return -ELOOP", one depth per interpreter
ELF_MAGIC = b"\x7fELF"
ARG_ROOM = STACK_SIZE // 4   # bytes of argv and envp strings and pointers (fs/exec.c bprm_stack_limits)


@dataclass(frozen=True)
class Program:
    """What an execve loads: the ELF ``image`` (a script's interpreter for a script),
    the ``interpreter`` its PT_INTERP names, the final ``argv``, and ``filename`` as
    execve was given it (AT_EXECFN, and the process's comm)."""
    image: GuestImage
    interpreter: GuestImage | None
    argv: list
    filename: str


def open_exec(fs, cwd: str, path: str, follow: bool = True) -> tuple[str, HostNode]:
    """A file execve may run (do_open_execat, may_open): a regular file of the machine
    with an execute bit; a directory, a device or minivmm's own files are EACCES, and a
    symbolic link not to be followed ELOOP (O_NOFOLLOW)."""
    canonical, node = fs.resolve(path, cwd, follow)
    if st.S_ISLNK(node.mode):
        raise SyscallError(ELOOP)
    if not (isinstance(node, HostNode) and st.S_ISREG(node.mode) and node.mode & 0o111):
        raise SyscallError(EACCES)
    return canonical, node


def _spacetab(byte: int) -> bool:
    return byte in b" \t"


def _find(buf: bytes, first: int, last: int, wanted) -> int | None:
    """The first index in [first, last] whose byte is ``wanted`` (the kernel's
    next_non_spacetab and next_terminator)."""
    return next((i for i in range(first, last + 1) if wanted(buf[i])), None)


def parse_script(head: bytes) -> tuple[str, str | None]:
    """The interpreter and its optional argument from the first line of a ``#!`` file,
    as fs/binfmt_script.c load_script reads its BINPRM_BUF_SIZE bytes: a line that does
    not end in them is refused where the interpreter's path would be cut; trailing
    spaces and tabs go; everything after the name's separator is one argument."""
    if head[:2] != b"#!":
        raise SyscallError(ENOEXEC)
    buf = head[:BINPRM_BUF_SIZE].ljust(BINPRM_BUF_SIZE, b"\0")   # zero past the file's end
    last = BINPRM_BUF_SIZE - 1
    nul = buf.find(b"\0")
    end = buf.find(b"\n", 0, nul if nul >= 0 else BINPRM_BUF_SIZE)   # strnchr stops at a NUL
    if end < 0:
        start = _find(buf, 2, last, lambda c: not _spacetab(c))
        if start is None or _find(buf, start, last, lambda c: _spacetab(c) or not c) is None:
            raise SyscallError(ENOEXEC)   # the interpreter's path would be truncated
        end = last
    while _spacetab(buf[end - 1]):
        end -= 1
    name = _find(buf, 2, end, lambda c: not _spacetab(c))
    if name is None or name == end:
        raise SyscallError(ENOEXEC)   # no interpreter named
    separator = _find(buf, name, end, lambda c: _spacetab(c) or not c)
    argument = _find(buf, separator, end, lambda c: not _spacetab(c)) \
        if separator is not None and buf[separator] else None

    def text(first: int, stop: int) -> str:   # a C string: it ends at a NUL
        return buf[first:stop].split(b"\0")[0].decode("utf-8", "surrogateescape")
    if argument is None:
        return text(name, end), None
    return text(name, separator), text(argument, end)


def _read(path: str, node: HostNode, count: int | None = None) -> bytes:
    """The file's first ``count`` bytes, or all of them (at most MAX_IMAGE: ENOMEM)."""
    try:
        entry = HostFile(path, node, 0)
    except OSError as e:
        raise SyscallError(e.errno or EACCES) from None
    try:
        if count is None:
            count = entry.size()
            if count > MAX_IMAGE:
                raise SyscallError(ENOMEM)
        return entry.pread(count, 0)
    finally:
        entry.close()


def load_image(path: str, node: HostNode, canonical: str, filename: str, base: int | None = None) -> GuestImage:
    """The ELF at ``canonical`` as a Linux program (binfmt_elf: what is no x86-64
    executable or shared object is ENOEXEC); its mappings named by its path in the
    program's file system, AT_EXECFN ``filename``; ``base`` as load_elf takes it."""
    try:
        image = load_elf(_read(path, node), filename, node.host, linux=True, base=base)
    except MinivmmError:
        raise SyscallError(ENOEXEC) from None
    return replace(image, linux={**image.linux, "exe": canonical, "execfn": filename})


def read_interpreter(fs, cwd: str, path: str) -> GuestImage:
    """The dynamic loader PT_INTERP names (load_elf_binary): opened as open_exec opens
    it, an ELF shared object (ET_DYN) without an interpreter of its own (ELIBBAD
    otherwise), placed where a free range is when it is mapped (base 0 here)."""
    canonical, node = open_exec(fs, cwd, path)
    if _read(path, node, len(ELF_MAGIC)) != ELF_MAGIC:
        raise SyscallError(ELIBBAD)
    try:
        image = load_image(path, node, canonical, path, base=0)
    except SyscallError:
        raise SyscallError(ELIBBAD) from None
    if image.linux["interp"] or not image.linux["dynamic"]:
        raise SyscallError(ELIBBAD)
    return image


def find_program(fs, cwd: str, path: str, argv: list, follow: bool = True, filename: str | None = None,
                 process_cwd: str | None = None) -> Program:
    """The program execve runs for ``path`` (from ``cwd``, execveat's directory) and
    ``argv``; ``filename`` is the path as the kernel names it (bprm->filename:
    /dev/fd/N/... for a descriptor; default ``path``). A script's first line replaces
    argv[0] by the interpreter, its argument and the script's path (load_script), and
    the interpreter is looked at in turn, at most MAX_REWRITES times (ELOOP). Interpreters,
    a script's and PT_INTERP, are opened from the process's working directory
    ``process_cwd`` (default ``cwd``), as open_exec and open_exec of PT_INTERP do."""
    filename = path if filename is None else filename
    process_cwd = cwd if process_cwd is None else process_cwd
    script = filename
    for depth in itertools.count():
        canonical, node = open_exec(fs, cwd if depth == 0 else process_cwd, path, follow or depth > 0)
        if depth > MAX_REWRITES:
            raise SyscallError(ELOOP)
        head = _read(path, node, BINPRM_BUF_SIZE)
        if head[:4] == ELF_MAGIC:
            image = load_image(path, node, canonical, filename)
            interp = image.linux["interp"]
            return Program(image, read_interpreter(fs, process_cwd, interp) if interp else None, argv, filename)
        interpreter, argument = parse_script(head)
        argv = [interpreter, *([argument] if argument is not None else []), script, *argv[1:]]
        path = script = interpreter


def arguments_size(strings) -> int:
    """What arguments and environment take of the stack: each string and a pointer to it
    (fs/exec.c: past ARG_ROOM execve fails with E2BIG)."""
    return sum(len(s.encode("utf-8", "surrogateescape")) + 1 + 8 for s in strings)


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


def stack_layout(ram_size: int) -> tuple[int, int]:
    """The stack's top and bottom: 8 MiB below the last page of RAM."""
    stack_top = ram_size - PAGE
    return stack_top, stack_top - STACK_SIZE


def fits(program: Program, ram_size: int) -> bool:
    """The image between MMAP_MIN and the stack, and room for its interpreter and the
    vDSO between them (the address space is empty when it is loaded)."""
    image, interpreter = program.image, program.interpreter
    end = page_up(image.end)
    mmap_top = stack_layout(ram_size)[1] - PAGE
    room = mmap_top - end - PAGE - (page_up(interpreter.end) if interpreter else 0) - 2 * PAGE   # and the vDSO
    return min(address for address, _, _ in image.segments) >= MMAP_MIN and end <= mmap_top and room >= 0


def load_program(uc, process: Process, program: Program, env: list[str], seed: int, view) -> None:
    """What load_elf_binary does once the image is known to load, into the process's
    empty address space: the image, its interpreter top-down below the stack, the stack
    with argv, envp and the auxiliary vector, brk after the image; RIP, RSP, RFLAGS
    and the data segments as start_thread sets them; comm from the file's name."""
    image, interpreter, info = program.image, program.interpreter, program.image.linux
    end = page_up(image.end)
    stack_top, stack_bottom = stack_layout(len(process.ram))
    process.brk_start = process.brk = end
    process.mmap_top, process.stack_bottom = stack_bottom - PAGE, stack_bottom
    process.exe, process.argv = info["exe"], list(program.argv)
    process.comm = os.path.basename(program.filename).encode("utf-8", "surrogateescape")[:15]
    map_image(process, image)
    process.memory.map(stack_bottom, STACK_SIZE, PROT_READ | PROT_WRITE, "[stack]")
    base, entry = 0, image.entry
    if interpreter:
        base = process.memory.find_free(page_up(interpreter.end), process.mmap_top, end + PAGE)
        map_image(process, interpreter, base)
        entry = base + interpreter.entry
    vdso_at = vdso.map_into(process, process.mmap_top, end + PAGE)   # after the interpreter (arch_setup_additional_pages)
    auxv = [(AT_SYSINFO_EHDR, vdso_at), (AT_PHDR, info["phdr"]), (AT_PHENT, 56), (AT_PHNUM, info["phnum"]),
            (AT_PAGESZ, PAGE),
            (AT_BASE, base), (AT_FLAGS, 0), (AT_ENTRY, image.entry), (AT_UID, 1000), (AT_EUID, 1000),
            (AT_GID, 1000), (AT_EGID, 1000), (AT_HWCAP, hwcap(view)), (AT_HWCAP2, hwcap2(view)),
            (AT_CLKTCK, 100), (AT_SECURE, 0), (AT_MINSIGSTKSZ, min_sigstack(view))]
    rsp = build_stack(process, stack_top, program.argv, env, auxv, seed, program.filename)
    for reg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES):
        uc.reg_write(reg, USER_DS)
    uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x202)
    uc.reg_write(x86.UC_X86_REG_RSP, rsp)
    uc.reg_write(x86.UC_X86_REG_RIP, entry)
