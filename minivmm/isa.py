"""Instructions and the CPUID features they need, with iced-x86 as the decoder."""

from __future__ import annotations

import functools

import iced_x86

from .features import catalogue

# iced-x86 CpuidFeature names that differ from the Linux feature names.
ICED_TO_LINUX = {
    "SSE3": "pni", "CMPXCHG16B": "cx16", "LZCNT": "abm", "D3NOW": "3dnow",
    "D3NOWEXT": "3dnowext", "CLFSH": "clflush", "SHA": "sha_ni", "PREFETCHW": "3dnowprefetch",
    "CET_SS": "shstk", "CET_IBT": "ibt", "SGX1": "sgx", "SKINIT_OR_SVM": "svm", "HLE_OR_RTM": "rtm",
    "MONITORX": "mwaitx", "INVEPT": "vmx", "INVVPID": "vmx",
}
# Features every x86-64 CPU has (or that name no CPUID bit): never the cause of #UD.
BASELINE = frozenset({
    "INTEL8086", "INTEL186", "INTEL286", "INTEL386", "INTEL486", "X64", "CPUID", "FPU", "FPU387",
    "MULTIBYTENOP", "PAUSE", "MSR", "TSC", "CMOV", "CX8", "SEP", "FXSR", "SSE", "SSE2", "MMX",
    "SYSCALL", "SMM",
})
_FEATURE_NAMES = {v: k for k, v in vars(iced_x86.CpuidFeature).items() if k.isupper()}
_FORMATTER = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)


@functools.cache
def linux_name(iced_feature: int) -> str | None:
    name = _FEATURE_NAMES.get(iced_feature, "")
    if name in BASELINE:
        return None
    linux = ICED_TO_LINUX.get(name, name.lower())
    feature = catalogue().get(linux)
    return feature.name if feature else linux


def decode(code: bytes, address: int):
    """(disassembly, features the instruction needs) of the first instruction in code."""
    decoder = iced_x86.Decoder(64, code, ip=address)
    instr = decoder.decode()
    if instr.is_invalid:
        return "(bad)", []
    features = [n for n in (linux_name(f) for f in instr.cpuid_features()) if n]
    return _FORMATTER.format(instr), sorted(set(features))
