"""execve, as far as the program can tell: the CPU in user mode with Linux's segments,
EFER.SCE on, CR4 and XCR0 as Linux sets them from the CPU's features (here: the VM's
CPUID view), the image in place, and the initial stack."""

from __future__ import annotations

import struct

import unicorn.x86_const as x86

from ..cpu.features import catalogue
from .process import (AT_BASE, AT_CLKTCK, AT_EGID, AT_ENTRY, AT_EUID, AT_FLAGS, AT_GID, AT_HWCAP, AT_HWCAP2,
                      AT_MINSIGSTKSZ, AT_PAGESZ, AT_PHDR, AT_PHENT, AT_PHNUM, AT_SECURE, AT_UID, DEFAULT_ENV,
                      PAGE, STACK_SIZE, USER_CS, USER_DS, Process, build_stack, hwcap, hwcap2, min_sigstack,
                      page_up)

GDT_BASE = 0x1000
# null, kernel code 0x08, kernel data 0x10, (0x18 unused), user32 code 0x23, user data 0x2b,
# user code 0x33: the order syscall/sysret need (arch/x86/include/asm/segment.h).
GDT = struct.pack("<7Q", 0, 0x00209A0000000000, 0x0000920000000000, 0, 0x00CFFA000000FFFF,
                  0x0000F20000000000, 0x0020FA0000000000)
EFER_SCE = 1
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_FSGSBASE, CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 16, 1 << 18
XCR0_X87_SSE, XCR0_AVX, XCR0_AVX512 = 0x3, 0x4, 0xE0


def linux_cr4(view) -> int:
    has = lambda name: view.has(catalogue()[name])  # noqa: E731
    return (CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if has("xsave") else 0)
            | (CR4_FSGSBASE if has("fsgsbase") else 0))


def linux_xcr0(view) -> int:
    """What Linux enables (fpu__init_system_xstate): every state component the CPU has
    that it supports; here x87, SSE, AVX and AVX-512 as the view shows them."""
    has = lambda name: view.has(catalogue()[name])  # noqa: E731
    return XCR0_X87_SSE | (XCR0_AVX if has("avx") else 0) | (XCR0_AVX512 if has("avx512f") else 0)


def start_process(uc, ram, image, view, argv, env, seed: int, write_xcr0) -> Process:
    memory = len(ram)
    for address, data, _ in image.segments:
        ram[address:address + len(data)] = data
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
    info = image.linux
    end = max(address + size for address, _, size in image.segments)
    stack_top = memory - PAGE
    process = Process(ram, page_up(end), page_up(end), stack_top - STACK_SIZE - PAGE, stack_top - STACK_SIZE,
                      info["exe"])
    auxv = [(AT_PHDR, info["phdr"]), (AT_PHENT, 56), (AT_PHNUM, info["phnum"]), (AT_PAGESZ, PAGE),
            (AT_BASE, 0), (AT_FLAGS, 0), (AT_ENTRY, image.entry), (AT_UID, 1000), (AT_EUID, 1000),
            (AT_GID, 1000), (AT_EGID, 1000), (AT_HWCAP, hwcap(view)), (AT_HWCAP2, hwcap2(view)),
            (AT_CLKTCK, 100), (AT_SECURE, 0), (AT_MINSIGSTKSZ, min_sigstack(view))]
    rsp = build_stack(process, stack_top, [info["execfn"], *argv], list(env if env is not None else DEFAULT_ENV),
                      auxv, seed, info["execfn"])
    for reg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES, x86.UC_X86_REG_SS):
        uc.reg_write(reg, USER_DS)
    uc.reg_write(x86.UC_X86_REG_CS, USER_CS)
    uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x202)
    uc.reg_write(x86.UC_X86_REG_RSP, rsp)
    uc.reg_write(x86.UC_X86_REG_RIP, image.entry)
    return process
