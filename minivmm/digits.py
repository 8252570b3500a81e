"""Numbers as minivmm's inputs write them: ASCII digits only.

Python's int() and float() also read other scripts' digits ('１６', '١٦'), '_' between
digits and surrounding spaces. No documented format has them, so a value written with
them is refused rather than read as a number nobody typed."""

from __future__ import annotations

import re

_DECIMAL = re.compile(r"[0-9]+")
_INTEGER = re.compile(r"-?[0-9]+")
_CANONICAL = re.compile(r"0|[1-9][0-9]*")
_HEX = re.compile(r"(0[xX])?[0-9a-fA-F]+")
_REAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def decimal(text: str) -> int | None:
    """A number of decimal digits (leading zeros allowed), or None."""
    return int(text) if _DECIMAL.fullmatch(text) else None


def integer(text: str) -> int | None:
    """A decimal number, perhaps negative, or None."""
    return int(text) if _INTEGER.fullmatch(text) else None


def canonical(text: str) -> int | None:
    """A number as str() writes it (no sign, no leading zero): a JSON key holding a
    number has one spelling, so two keys never name the same number."""
    return int(text) if _CANONICAL.fullmatch(text) else None


def number(text: str, hex_default: bool = False) -> int | None:
    """Decimal, or hex after 0x; bare hex too when ``hex_default``. None otherwise."""
    if text[:2].lower() == "0x" or hex_default:
        return int(text, 16) if _HEX.fullmatch(text) else None
    return decimal(text)


def real(text: str) -> float | None:
    """A decimal fraction such as 2, 0.5 or 1e3, or None."""
    return float(text) if _REAL.fullmatch(text) else None
