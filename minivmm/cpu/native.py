"""The CPUID table of the machine minivmm runs on, read without root.

CPUID is unprivileged, so a tiny function in an executable page runs it directly
(what ``cpuid -1 -r`` does in C); the dump is then enumerated the way that tool does.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import time

from ..errors import MinivmmError
from .table import EXTENDED, CpuidTable

# void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4])  (System V x86-64)
_CODE = bytes.fromhex(
    "53"            # push rbx
    "89f8"          # mov eax, edi
    "89f1"          # mov ecx, esi
    "4989d0"        # mov r8, rdx
    "0fa2"          # cpuid
    "418900"        # mov [r8], eax
    "41895804"      # mov [r8+4], ebx
    "41894808"      # mov [r8+8], ecx
    "4189500c"      # mov [r8+12], edx
    "5b"            # pop rbx
    "c3"            # ret
)

# Indexed leaves and how far to enumerate their subleaves.
_SUBLEAF_LIMITS = {0x4: 16, 0x7: None, 0xB: 8, 0xD: 64, 0xF: 4, 0x10: 8, 0x12: 8, 0x14: None,
                   0x17: 4, 0x18: 16, 0x1D: 2, 0x1E: 2, 0x1F: 8, 0x20: 2, 0x23: 4, 0x24: 2,
                   0x8000001D: 16, 0x80000020: 4, 0x80000026: 4}


# uint64_t xgetbv0(void): XCR0, the state components the machine's OS enabled
_XGETBV = bytes.fromhex("31c9" "0f01d0" "48c1e220" "4809d0" "c3")  # xor ecx,ecx; xgetbv; shl rdx,32; or rax,rdx; ret

# uint64_t rdtsc(void)
_RDTSC = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")  # rdtsc; shl rdx, 32; or rax, rdx; ret


@functools.cache
def executable(code: bytes, restype, *argtypes):
    """A function of the machine code ``code`` (System V x86-64), callable through
    ctypes, and the page that holds it (kept alive by the cache)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise MinivmmError(f"this needs an x86-64 machine, this one is {platform.machine()}")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(restype, *argtypes)(address), page


def rdtsc() -> int:
    """The host's time-stamp counter (the engine's RDTSC reads the same)."""
    try:
        fn, _page = executable(_RDTSC, ctypes.c_uint64)
    except MinivmmError:
        return time.perf_counter_ns()
    return fn()


# void control_words(uint32_t out[2]): this process's MXCSR and x87 control word
_CONTROL_WORDS = bytes.fromhex("0fae1f" "d97f04" "c3")  # stmxcsr [rdi]; fnstcw [rdi+4]; ret


def control_words() -> tuple[int, int]:
    """This process's MXCSR and x87 control word (what no guest may change)."""
    fn, _page = executable(_CONTROL_WORDS, None, ctypes.c_void_p)
    out = (ctypes.c_uint32 * 2)()
    fn(out)
    return out[0], out[1] & 0xFFFF


@functools.cache
def _cpuid_function():
    return executable(_CODE, None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    fn, _page = _cpuid_function()
    out = (ctypes.c_uint32 * 4)()
    fn(leaf, subleaf, out)
    return tuple(out)


def _subleaves(leaf: int, first: tuple[int, int, int, int]) -> range:
    limit = _SUBLEAF_LIMITS[leaf]
    if limit is None:  # leaves 7 and 0x14 report their last subleaf in EAX
        return range(min(first[0], 31) + 1)
    return range(limit)


def read_table() -> CpuidTable:
    entries = {}
    for base in (0, EXTENDED):
        top = cpuid(base)[0]
        if base == EXTENDED and top < EXTENDED:
            break
        for leaf in range(base, min(top, base + 0xFF) + 1):
            first = cpuid(leaf, 0)
            entries[(leaf, 0)] = first
            if leaf in _SUBLEAF_LIMITS:
                for sub in _subleaves(leaf, first)[1:]:
                    regs = cpuid(leaf, sub)
                    if any(regs) and regs != (0, 0, sub & 0xFF, 0):
                        entries[(leaf, sub)] = regs
    # As libvirt's dumps do: present logical CPU 0 whichever CPU this thread ran on.
    a, b, c, d = entries[(1, 0)]
    entries[(1, 0)] = (a, b & 0x00FFFFFF, c, d)
    for (leaf, sub), (a, b, c, d) in list(entries.items()):
        if leaf in (0xB, 0x1F):
            entries[(leaf, sub)] = (a, b, c, 0)
    return CpuidTable(entries, "native")


_NEEDS_YMM = ("avx", "avx2", "fma", "f16c", "vaes", "vpclmulqdq", "avx_vnni")


@functools.cache
def machine_features() -> frozenset[str]:
    """The features instructions may use on this machine: its CPUID bits, less the
    vector extensions whose register state its OS did not enable in XCR0 (executing one
    would be #UD in minivmm's own process)."""
    from .features import catalogue
    from .isa import XCR0_AVX512, XCR0_YMM
    table = read_table()
    features = set(catalogue().decode(table))
    xcr0 = 0
    if table[(1, 0)][2] >> 27 & 1:  # OSXSAVE: XGETBV is allowed
        fn, _page = executable(_XGETBV, ctypes.c_uint64)
        xcr0 = fn()
    if xcr0 & XCR0_YMM != XCR0_YMM:
        features -= {f for f in features if f in _NEEDS_YMM or f.startswith("avx512")}
    if xcr0 & XCR0_AVX512 != XCR0_AVX512:
        features -= {f for f in features if f.startswith("avx512")}
    return frozenset(features)
