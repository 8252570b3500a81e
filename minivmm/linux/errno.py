"""The errno values of Linux x86-64 (include/uapi/asm-generic/errno-base.h, errno.h)."""

EPERM, ENOENT, ESRCH, EINTR, EIO, ENXIO, E2BIG, ENOEXEC, EBADF, ECHILD = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
EAGAIN, ENOMEM, EACCES, EFAULT, EBUSY, EEXIST, ENODEV, ENOTDIR, EISDIR, EINVAL = 11, 12, 13, 14, 16, 17, 19, 20, 21, 22
EMFILE, ENOTTY, EFBIG, ENOSPC, ESPIPE, EROFS, EPIPE, ERANGE, ENAMETOOLONG, ENOSYS = 24, 25, 27, 28, 29, 30, 32, 34, 36, 38
ELOOP, ENODATA, ELIBBAD, EOPNOTSUPP, EAFNOSUPPORT, ETIMEDOUT = 40, 61, 80, 95, 97, 110


class SyscallError(Exception):
    """A system call fails with this errno (returned to the program as -errno)."""

    def __init__(self, errno: int):
        super().__init__(errno)
        self.errno = errno
