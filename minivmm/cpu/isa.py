"""Instructions, the CPUID features they need, and what a host does with each.

iced-x86 decodes and names the features an instruction needs; this module decides,
for a host's physical ISA and the engine's abilities, whether an instruction runs
natively, raises #UD, runs as an older instruction (LZCNT as BSR), or cannot be run
exactly by the engine at all.
"""

from __future__ import annotations

import csv
import functools
from enum import Enum
from importlib import resources

import iced_x86
from iced_x86 import Mnemonic

from .features import catalogue

# iced-x86 CpuidFeature names that differ from the Linux feature names.
ICED_TO_LINUX = {
    "SSE3": "pni", "CMPXCHG16B": "cx16", "LZCNT": "abm", "D3NOW": "3dnow",
    "D3NOWEXT": "3dnowext", "CLFSH": "clflush", "SHA": "sha_ni", "PREFETCHW": "3dnowprefetch",
    "CET_SS": "shstk", "CET_IBT": "ibt", "SGX1": "sgx", "SKINIT_OR_SVM": "svm", "HLE_OR_RTM": "rtm",
    "MONITORX": "mwaitx", "INVEPT": "vmx", "INVVPID": "vmx",
    "AVX512_IFMA": "avx512ifma", "AVX512_VBMI": "avx512vbmi", "AESKLE": "aes_keylocker",
    "WIDE_KL": "aes_keylocker_wide", "KL": "key_locker", "MSRLIST": "rd_wr_msrlist", "SEV_SNP": "sev",
    "RMPQUERY": "sev",
}
# iced-x86 features no CPU minivmm emulates can have, each for a reason: pre-x86-64
# CPUs and their instructions (which 64-bit mode decodes differently or not at all),
# other vendors' extensions, and encodings without a CPUID bit in the catalogue. An
# instruction needing one raises #UD on every host, which is what those CPUs would do.
DELIBERATELY_UNMAPPED = {
    **dict.fromkeys(("INTEL8086_ONLY", "INTEL286_ONLY", "INTEL386_ONLY", "INTEL386_A0_ONLY", "INTEL486_A_ONLY",
                     "FPU287XL_ONLY", "FPU387SL_ONLY", "MOV_TR", "UMOV"),
                    "only on pre-x86-64 processors"),
    **dict.fromkeys(("CYRIX_D3NOW", "CYRIX_DDI", "CYRIX_DMI", "CYRIX_EMMI", "CYRIX_FPU", "CYRIX_SHR", "CYRIX_SMINT",
                     "CYRIX_SMINT_0F7E", "CYRIX_SMM"), "Cyrix processors, none of them x86-64"),
    **dict.fromkeys(("CENTAUR_AIS", "PADLOCK_ACE", "PADLOCK_GMI", "PADLOCK_PHE", "PADLOCK_PMM", "PADLOCK_RNG",
                     "PADLOCK_UNDOC"), "VIA/Zhaoxin PadLock: no VIA profile, and no such bits in the catalogue"),
    "KNC": "Knights Corner coprocessor instructions, not an x86-64 CPU's",
    "CL1INVMB": "Intel SCC only", "OSS": "Zhaoxin only", "UDBG": "undocumented debug opcodes",
    "TDX": "TDX guest calls (TDCALL/SEAMCALL): not in the catalogue, no profile has them",
    "RAO_INT": "not in the catalogue yet (Intel's RAO-INT, no profile has it)",
    "TSE": "not in the catalogue yet (Intel TSE, no profile has it)",
}
# Features every x86-64 CPU has (or that name no CPUID bit): never the cause of #UD.
BASELINE = frozenset({
    "INTEL8086", "INTEL186", "INTEL286", "INTEL386", "INTEL486", "X64", "CPUID", "FPU", "FPU387",
    "MULTIBYTENOP", "PAUSE", "MSR", "TSC", "CMOV", "CX8", "SEP", "FXSR", "SSE", "SSE2", "MMX",
    "SYSCALL", "SMM", "RDPMC",   # RDPMC: every P6 and later CPU, no CPUID bit (SDM Vol. 2B)
    "FPU287",   # iced-x86's "287 and later": FNSTSW AX, and FNSETPM, which the 387 on made a no-op
})
_FEATURE_NAMES = {v: k for k, v in vars(iced_x86.CpuidFeature).items() if k.isupper()}
_FORMATTER = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
_FORMATTER.space_after_operand_separator = True
# LAHF/SAHF are 8086 instructions, but in 64-bit mode they need CPUID.80000001H:ECX[0]
# (Intel SDM Vol. 2A, LAHF: "#UD ... if CPUID.80000001H:ECX.LAHF-SAHF[bit 0] = 0").
_LONG_MODE_EXTRAS = {Mnemonic.LAHF: "lahf_lm", Mnemonic.SAHF: "lahf_lm"}


class Verdict(Enum):
    RUN = "run"                  # the engine executes it exactly
    UD = "#UD"                   # the host does not have it
    UNSUPPORTED = "unsupported"  # the host has it, the engine cannot run it exactly
    AS_BSR = "as bsr"            # LZCNT on a host without ABM: the REP prefix is ignored
    AS_BSF = "as bsf"            # TZCNT on a host without BMI1


@functools.cache
def linux_name(iced_feature: int) -> str | None:
    name = _FEATURE_NAMES.get(iced_feature, "")
    if name in BASELINE:
        return None
    linux = ICED_TO_LINUX.get(name, name.lower())
    feature = catalogue().get(linux)
    return feature.name if feature else linux


@functools.cache
def engine_capable() -> frozenset[str]:
    with resources.files("minivmm").joinpath("data", "engine-isa.csv").open() as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return frozenset(r["feature"] for r in rows if r["executes"] == "yes")


def needed_features(instr) -> frozenset[str]:
    return _needs(instr.code, instr.mnemonic, tuple(instr.cpuid_features()))


@functools.cache
def _needs(code: int, mnemonic: int, iced_features: tuple[int, ...]) -> frozenset[str]:
    names = {n for n in (linux_name(f) for f in iced_features) if n}
    if mnemonic in _LONG_MODE_EXTRAS:
        names.add(_LONG_MODE_EXTRAS[mnemonic])
    return frozenset(names)


# CET instructions encoded in the reserved-NOP space (0F 1E): a CPU without CET executes
# them as NOPs, which is why compilers emit ENDBR64 unconditionally (Intel SDM Vol. 2A,
# ENDBR64 and RDSSP: "treated as NOP" when CET is not enabled). MPX's 0F 1A/1B forms
# need no entry: iced-x86 decodes them as the NOPs they are unless told to decode MPX.
# CLDEMOTE (0F 1C /0) is a hint in that space too: "treated as a NOP" where the processor
# does not support it (SDM Vol. 2A, CLDEMOTE).
_NOP_SPACE = {
    "ibt": {Mnemonic.ENDBR32, Mnemonic.ENDBR64},
    "shstk": {Mnemonic.RDSSPD, Mnemonic.RDSSPQ},
    "cldemote": {Mnemonic.CLDEMOTE},
}


def hinted(mnemonic: int) -> frozenset[str]:
    """The features whose absence makes ``mnemonic`` a NOP: executing it uses none of
    them (an audit never reports it, as a binary built with CET runs everywhere)."""
    return frozenset(feature for feature, mnemonics in _NOP_SPACE.items() if mnemonic in mnemonics)


# Instructions of features the engine executes that it gets wrong, found by comparing
# every form with the machine's CPU (tests/test_native_forms.py): they exit like AVX.
ENGINE_WRONG = {
    Mnemonic.BLSI: "CF is clear for a nonzero source (SDM: set)",
    Mnemonic.BZHI: "an index at or past the operand size clears the top bit (SDM: the source unchanged)",
    Mnemonic.PDEP: "the 32-bit form deposits from the 64-bit registers and leaves bits 63:32",
    **dict.fromkeys((Mnemonic.XSAVE, Mnemonic.XSAVE64, Mnemonic.XSAVEOPT, Mnemonic.XSAVEOPT64, Mnemonic.XRSTOR,
                     Mnemonic.XRSTOR64), "YMM's upper halves are neither saved nor restored"),
}


# Legacy SSE forms after which the engine leaves its own stack contents in bits 511:128
# of the destination (a whole vector register written from a 16-byte result), where the
# SDM keeps them unchanged: guest-visible, and the VMM's memory, wherever YMM exists.
# Found by running every legacy SSE form with the upper halves set (tests/test_isa.py).
UPPER_CLOBBERED = frozenset((iced_x86.Code.PSHUFB_XMM_XMMM128, iced_x86.Code.MPSADBW_XMM_XMMM128_IMM8))


def verdict(needs: frozenset[str], mnemonic: int, physical: frozenset[str], code: int | None = None) -> Verdict:
    missing = needs - physical
    if missing and missing <= hinted(mnemonic):
        return Verdict.RUN  # the engine's models decode these as NOPs too
    if not missing:
        exact = needs <= engine_capable() and mnemonic not in ENGINE_WRONG \
            and not (code in UPPER_CLOBBERED and "avx" in physical)
        return Verdict.RUN if exact else Verdict.UNSUPPORTED
    # Intel SDM Vol. 2A, LZCNT: "on processors that do not support LZCNT, the instruction
    # byte encoding is executed as BSR"; TZCNT likewise as BSF.
    if mnemonic == Mnemonic.LZCNT and missing == {"abm"}:
        return Verdict.AS_BSR
    if mnemonic == Mnemonic.TZCNT and missing == {"bmi1"}:
        return Verdict.AS_BSF
    return Verdict.UD


# Control bits an OS sets before some instruction families work; without them the CPU
# raises #UD whatever CPUID says (Intel SDM Vol. 3A, 2.5 "Control Registers").
CR4_OSFXSR, CR4_FSGSBASE, CR4_OSXSAVE, CR4_PKE = 1 << 9, 1 << 16, 1 << 18, 1 << 22
_CR4_NEEDS = {
    **dict.fromkeys(("SSE", "SSE2", "SSE3", "SSSE3", "SSE4_1", "SSE4_2", "SSE4A", "AES", "PCLMULQDQ", "SHA"),
                    CR4_OSFXSR),
    **dict.fromkeys(("XSAVE", "XSAVEOPT", "XSAVEC", "XSAVES", "AVX", "AVX2", "FMA", "F16C", "AVX512F",
                     "AVX512VL", "AVX512BW", "AVX512DQ", "AVX512CD", "VAES", "VPCLMULQDQ", "AVX_VNNI"), CR4_OSXSAVE),
    "FSGSBASE": CR4_FSGSBASE, "PKU": CR4_PKE,
}


def cr4_allows(instr, cr4: int) -> bool:
    """False when a CR4 enable bit the instruction needs is clear (an architectural #UD)."""
    return all(cr4 & _CR4_NEEDS.get(_FEATURE_NAMES.get(f, ""), cr4) for f in instr.cpuid_features())


# State components an instruction's registers live in: VEX/EVEX instructions raise #UD
# unless XCR0 enables them (Intel SDM Vol. 1, 13.3: "XCR0[2:1] must be 11b" for AVX;
# XCR0[7:5] and [2:1] for AVX-512), whatever CPUID says.
XCR0_YMM, XCR0_AVX512 = 0x6, 0xE6


_XSAVE_ITSELF = {"XSAVE", "XSAVEOPT", "XSAVEC", "XSAVES"}
_AVX_STATE = {name for name, bit in _CR4_NEEDS.items() if bit == CR4_OSXSAVE} - _XSAVE_ITSELF


def xcr0_needed(instr) -> int:
    names = {_FEATURE_NAMES.get(f, "") for f in instr.cpuid_features()}
    if any(n.startswith("AVX512") for n in names):
        return XCR0_AVX512
    return XCR0_YMM if names & _AVX_STATE else 0


def os_disabled(instr, cr4: int, read_xcr0) -> str | None:
    """Why the guest's control registers make this instruction #UD, or None.
    ``read_xcr0()`` is called only for instructions whose state XCR0 enables."""
    if not cr4_allows(instr, cr4):
        return "a CR4 enable bit it needs is clear"
    needed = xcr0_needed(instr)
    xcr0 = read_xcr0() if needed else None
    if xcr0 is not None and xcr0 & needed != needed:
        return f"XCR0 is {xcr0:#x}: the OS has not enabled the state it uses ({needed:#x})"
    return None


def disassemble(instr) -> str:
    return _FORMATTER.format(instr)
