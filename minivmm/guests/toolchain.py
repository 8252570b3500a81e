"""C guests: the freestanding runtime in ``guests/c`` and the system gcc.

A C guest is compiled as the guest ABI wants it (``-ffreestanding -nostdlib -static
-mno-red-zone``, linked at the load address, libgcc for ``__builtin_cpu_supports``)
into a static ELF64 that the loader runs like any other. A Linux program is built as
anyone builds one: ``gcc -static``, with glibc.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import MinivmmError
from ..files import MiB, check_output, read_bytes

CFLAGS = ("-ffreestanding", "-nostdlib", "-static", "-mno-red-zone", "-fno-pic", "-no-pie", "-O2",
          "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none",
          "-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments")
RUNTIME = ("crt0.S", "runtime.c")


MAX_SOURCE = 16 * MiB


def runtime_dir() -> Path:
    return Path(str(resources.files("minivmm").joinpath("guests", "shipped", "c")))


def compiler() -> str:
    """The C compiler: ``$CC`` or gcc; a clear error when there is none."""
    cc = os.environ.get("CC", "gcc")
    found = shutil.which(cc)
    if not found:
        raise MinivmmError(f"C compiler '{cc}' not found: C guests need gcc (e.g. apt install gcc), or set CC")
    return found


def linux_build_args(sources, output, cflags=()) -> list[str]:
    """The compiler's arguments that build a static Linux program, as anyone builds one."""
    return ["-static", "-O1", *cflags, "-o", str(output), *map(str, sources)]


def build_c(sources, output: str | os.PathLike | None = None, cflags=(), linux: bool = False) -> Path:
    """Compile and link C (or assembly) sources with the guest runtime into a static ELF,
    or (``linux``) into a static Linux program.

    Without ``output`` the image goes to a cache keyed by the sources' contents, so a
    test suite that builds the same guest for every host compiles it once."""
    paths = [Path(s) for s in sources]
    contents = [read_bytes(path, "C guest source", MAX_SOURCE) for path in paths]  # regular files, bounded
    runtime = runtime_dir()
    if output is None:
        digest = hashlib.sha256()
        for data in contents + [(runtime / r).read_bytes() for r in (*RUNTIME, "minivmm.h", "link.ld")]:
            digest.update(data)
        digest.update(repr((tuple(cflags), linux)).encode())
        cache = Path(os.environ.get("MINIVMM_CACHE", Path(tempfile.gettempdir()) / "minivmm-cache"))
        cache.mkdir(parents=True, exist_ok=True)
        cached = cache / f"{paths[0].stem}-{digest.hexdigest()[:16]}.elf"
        return cached if cached.is_file() else build_c(paths, cached, cflags, linux)  # built beside, renamed
    output = check_output(output, "guest image", paths)
    # The linker writes the image in place: build beside the target, rename when complete.
    partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    if linux:
        command = [compiler(), *linux_build_args(paths, partial, cflags)]
    else:
        command = [compiler(), *CFLAGS, *cflags, f"-I{runtime}", "-T", str(runtime / "link.ld"), "-o", str(partial),
                   *(str(runtime / r) for r in RUNTIME), *map(str, paths), "-lgcc"]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if not done.returncode:
            os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["no output"]
        # The compiler's first error, or the linker's reason (collect2's summary says nothing).
        reasons = [line for line in lines if ": error:" in line and not line.startswith("collect2")] + \
            [line for line in lines if "undefined reference" in line or "cannot" in line] + lines[-1:]
        first = reasons[0]
        raise MinivmmError(f"building {paths[0]} failed: {first}")
    return output
