"""execve and execveat (fs/exec.c): the calling process's image replaced in place. The
path, argv and envp are read from the program's memory and the program the path names
is found (:func:`minivmm.linux.binfmt.find_program`) before anything changes, so a
failed execve returns its errno to the program as it was. Then, past the point of no
return (begin_new_exec): a new address space, descriptors marked close-on-exec closed,
signal handlers reset, registers as ELF_PLAT_INIT and start_thread leave them, and the
new image loaded as the first one was (:func:`minivmm.linux.binfmt.load_program`).
The process stays the same process: its pid, descriptors, working directory, blocked
mask and pending signals, clock, interval timers (not POSIX timers) and statistics."""

from __future__ import annotations

import struct

import unicorn.x86_const as x86

from ..binfmt import ARG_ROOM, arguments_size, find_program, fits, load_program, open_exec
from ..errno import E2BIG, EINVAL, ENAMETOOLONG, ENOENT, ENOMEM, SyscallError
from ..memory import MMAP_MIN
from ..process import xfeatures
from .base import RETURNED, signed32
from .files import AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, _base, _path

MAX_ARG_STRLEN = 32 * 4096        # include/uapi/linux/binfmts.h: one argument or variable at most
# ELF_PLAT_INIT clears them all; FS and GS are null with base 0 (start_thread_common)
CLEARED = tuple(getattr(x86, f"UC_X86_REG_{name}") for name in (
    "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15",
    "FS", "GS", "FS_BASE", "GS_BASE"))


def _strings(k, address: int, room: int) -> list[str]:
    """A NULL-terminated array of string pointers (fs/exec.c count, copy_strings; NULL
    is an empty array): EFAULT where a pointer or a string cannot be read, E2BIG for a
    string longer than MAX_ARG_STRLEN or past ``room`` bytes with the pointers."""
    out: list[str] = []
    while address:
        pointer = struct.unpack("<Q", k.p.read(address + 8 * len(out), 8))[0]
        if not pointer:
            break
        try:
            text = k.p.read_string(pointer, min(MAX_ARG_STRLEN, max(room, 0)))
        except SyscallError as e:
            raise SyscallError(E2BIG if e.errno == ENAMETOOLONG else e.errno) from None
        room -= len(text) + 1 + 8
        if room < 0:
            raise SyscallError(E2BIG)
        out.append(text.decode("utf-8", "surrogateescape"))
    return out


def sys_execveat(k, uc, dirfd, path_at, argv_at, envp_at, flags, *_):
    if flags & ~(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW):
        raise SyscallError(EINVAL)
    path, dirfd = _path(k, path_at), signed32(dirfd)
    if not path and flags & AT_EMPTY_PATH:   # the descriptor's own file (fexecve)
        path, cwd, filename = k.fds.get(dirfd).path, "/", f"/dev/fd/{dirfd}"
    elif not path:
        raise SyscallError(ENOENT)
    else:
        cwd = _base(k, dirfd, path)
        filename = path if path.startswith("/") or dirfd == AT_FDCWD else f"/dev/fd/{dirfd}/{path}"
    follow = not flags & AT_SYMLINK_NOFOLLOW
    # alloc_bprm opens the file before the arguments are counted: ENOENT and EACCES first
    open_exec(k.fs, cwd, path, follow)
    argv = _strings(k, argv_at, ARG_ROOM)
    env = _strings(k, envp_at, ARG_ROOM - arguments_size(argv))
    program = find_program(k.fs, cwd, path, argv or [""], follow, filename,   # an empty argv gets "" (fs/exec.c)
                           process_cwd=k.cwd)
    if arguments_size([filename, *program.argv, *env]) > ARG_ROOM:   # a script's interpreter and argument too
        raise SyscallError(E2BIG)
    if not fits(program, k.p.memory.size):
        raise SyscallError(ENOMEM)
    _replace_image(k, uc, program, env)
    return RETURNED


def sys_execve(k, uc, path_at, argv_at, envp_at, *_):
    return sys_execveat(k, uc, AT_FDCWD, path_at, argv_at, envp_at, 0)


def _replace_image(k, uc, program, env: list[str]) -> None:
    """begin_new_exec and load_elf_binary past the point of no return."""
    p = k.p
    p.memory.unmap(MMAP_MIN, p.memory.size - MMAP_MIN)   # exec_mmap: the old mappings and brk go
    for fd in sorted(k.fds.cloexec):                      # do_close_on_exec
        k.fds.close(fd)
    k.signals.exec(uc)
    k.timers.exec()
    p.xcomp_perm = p.xcomp_guest_perm = xfeatures(k.view)[1]   # fpu_flush_thread's fpstate_reset: none requested
    for reg in CLEARED:
        uc.reg_write(reg, 0)
    load_program(uc, p, program, env, k.random.getrandbits(64), k.view)   # AT_RANDOM: new bytes, as Linux gives
    p.execs += 1   # a vfork parent waits for this
    k.on_exec()


TABLE = {59: ("execve", sys_execve), 322: ("execveat", sys_execveat)}
