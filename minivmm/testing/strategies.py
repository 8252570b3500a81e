"""Hypothesis strategies for minivmm's domain: real host profiles, feature sets, CPUID
masks (in any format), EVC modes, clusters, migration schedules and matrix cells.
Compose them in your own tests::

    from hypothesis import given
    from minivmm.testing import strategies as mst

    @given(mst.profiles(), mst.masks(marks=False))
    def test_hiding_never_shows(profile, mask): ...

Every strategy draws from the real data minivmm ships; none needs a running VM.
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ModuleNotFoundError:  # an optional dependency: say how to get it
    raise ModuleNotFoundError("minivmm.testing.strategies needs hypothesis: "
                              "pip install 'minivmm[hypothesis]'", name="hypothesis") from None

from ..cpu.deps import hidden_closure
from ..cpu.features import catalogue
from ..cpu.profiles import builtin_names, dump_names, load_profile
from ..masking.evc import evc_modes, levelled_features
from ..masking.formats import format_mask
from ..masking.mask import Mask, RegisterMask, feature_mask

__all__ = ["FEATURE_REGISTERS", "FORMATS", "cells", "clusters", "evc_mode_keys", "feature_masks", "feature_names",
           "feature_sets", "hiding_masks", "mask_strings", "masks", "masks_for_format", "migration_schedules",
           "profile_names", "profiles", "register_masks", "triggers"]

# The registers where features live (leaf, subleaf, register), as masks touch them.
FEATURE_REGISTERS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                     (0xD, 1, "eax"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))
FORMATS = ("firecracker", "vmware", "xen", "features")


def profile_names(include_dumps: bool = False, vendor: str | None = None) -> st.SearchStrategy[str]:
    """Names of built-in profiles (and ``dump:NAME`` real CPUs when asked)."""
    names = builtin_names() + ([f"dump:{d}" for d in dump_names()] if include_dumps else [])
    if vendor:
        names = [n for n in names if load_profile(n).vendor == vendor]
    return st.sampled_from(names)


def profiles(include_dumps: bool = False, vendor: str | None = None):
    """Real host profiles (:class:`~minivmm.profiles.HostProfile`)."""
    return profile_names(include_dumps, vendor).map(load_profile)


def feature_names(levelled_only: bool = True) -> st.SearchStrategy[str]:
    """Linux feature names; by default the ones EVC levels and vMotion compares."""
    names = sorted(levelled_features()) if levelled_only else [f.name for f in catalogue()]
    return st.sampled_from(names)


def feature_sets(levelled_only: bool = True, max_size: int = 12):
    return st.frozensets(feature_names(levelled_only), max_size=max_size)


def register_masks(marks: bool | tuple[str, ...] = False) -> st.SearchStrategy[RegisterMask]:
    """One register's modifier: any (filter, value) pair, plus migration marks if asked
    (``True`` for every kind, or a tuple of kinds). Each bit carries at most one mark,
    and VMware's marks on a forced bit only where VMware can write it (R = 0 + match)."""
    kinds = ("must_one", "must_zero", "must_match", "ignored") if marks is True else tuple(marks or ())

    @st.composite
    def build(draw):
        filter_ = draw(st.integers(0, 0xFFFFFFFF))
        value = draw(st.integers(0, 0xFFFFFFFF)) & filter_
        planes = dict.fromkeys(kinds, 0)
        if kinds:
            for bit in range(32):
                kind = draw(st.sampled_from((None, *kinds)))
                forced = filter_ >> bit & 1
                if kind is None or (forced and not (kind == "must_match" and not value >> bit & 1)):
                    continue
                planes[kind] |= 1 << bit
        return RegisterMask(filter_, value, **planes)

    return build()


def masks(marks: bool | tuple[str, ...] = False, registers=FEATURE_REGISTERS, max_registers: int = 4):
    """Whole masks over the feature registers."""
    return st.dictionaries(st.sampled_from(registers), register_masks(marks), max_size=max_registers).map(Mask)


def hiding_masks(registers=FEATURE_REGISTERS, max_registers: int = 4):
    """Masks built only from 0 and x: they hide, never show."""
    return masks(registers=registers, max_registers=max_registers).map(
        lambda m: Mask({k: RegisterMask(r.filter, 0) for k, r in m.registers.items()}))


def feature_masks(levelled_only: bool = True):
    """Feature-list masks (``+a,-b``) as ``Mask`` objects, closed under dependencies as
    a parsed feature list is: what a hidden feature's dependents need stays hidden."""
    return st.tuples(feature_sets(levelled_only), feature_sets(levelled_only)).map(
        lambda sh: feature_mask(shown=sh[0], hidden=hidden_closure(sh[1]) - sh[0]))


def masks_for_format(fmt: str):
    """Masks that the given format can write exactly."""
    if fmt == "firecracker":
        return masks()
    if fmt == "xen":
        return masks(marks=("must_match",)).map(_only_unforced_marks)
    if fmt == "vmware":
        return masks(marks=True)
    if fmt == "features":
        return feature_masks(levelled_only=False)
    raise ValueError(f"unknown format {fmt!r}")


def _only_unforced_marks(mask: Mask) -> Mask:
    # Xen's k is "host value, kept on migration": a mark on a kept bit only.
    return Mask({k: RegisterMask(r.filter, r.value, must_match=r.must_match & ~r.filter)
                 for k, r in mask.registers.items()})


def mask_strings(fmt: str):
    """Mask strings in one format, as a user would write them."""
    return masks_for_format(fmt).filter(bool).map(lambda m: format_mask(m, fmt))


def evc_mode_keys(vendor: str | None = None):
    return st.sampled_from([k for k, m in evc_modes().items() if vendor in (None, m.vendor)])


def clusters(min_hosts: int = 1, max_hosts: int = 4, include_dumps: bool = False):
    """Lists of hosts of one vendor, as a vSphere cluster requires."""
    return st.sampled_from(("intel", "amd")).flatmap(
        lambda vendor: st.lists(profiles(include_dumps, vendor), min_size=min_hosts, max_size=max_hosts))


def triggers(max_checkpoint: int = 1, max_insns: int = 2_000_000):
    """Migration points: ``checkpoint:N`` or ``insn:N`` (exact and reproducible; never ``ms:``)."""
    return st.one_of(st.integers(1, max_checkpoint).map(lambda n: f"checkpoint:{n}"),
                     st.integers(1, max_insns).map(lambda n: f"insn:{n}"))


def migration_schedules(hosts, max_moves: int = 2, when=None):
    """Lists of ``PROFILE@WHEN`` for ``VM.run(migrations=...)``, destinations drawn from
    ``hosts`` (names), points in increasing order so that each one can come."""
    when = when if when is not None else st.integers(1, 2_000_000)

    @st.composite
    def build(draw):
        moves = draw(st.lists(st.tuples(st.sampled_from(list(hosts)), when), max_size=max_moves))
        points = sorted({n for _, n in moves})
        return [f"{host}@insn:{point}" for (host, _), point in zip(moves, points)]

    return build()


def cells(guest: str | None = None, hosts=None, evc: bool = True, migrate: bool = True, masks=None):
    """Matrix cells (:class:`minivmm.matrix.Cell`): a host, maybe an EVC mode the host
    supports, maybe a live migration to another host of the same vendor, and a mask
    drawn from ``masks`` (a strategy of :class:`Mask`, e.g. ``hiding_masks()``) if given."""
    from ..masking.evc import evc_mode
    from .matrix import Cell

    @st.composite
    def build(draw):
        host = draw(st.sampled_from(list(hosts)) if hosts else profile_names())
        profile = load_profile(host)
        mode = None
        if evc:
            supported = [k for k in evc_modes() if evc_mode(k).supported_by(profile)]
            mode = draw(st.none() | st.sampled_from(supported)) if supported else None
        migration = None
        if migrate:
            others = [h for h in (hosts or builtin_names()) if h != host and load_profile(h).vendor == profile.vendor]
            if others and draw(st.booleans()):
                migration = f"{draw(st.sampled_from(others))}@{draw(triggers())}"
        mask = draw(masks) if masks is not None else None
        return Cell(guest, host, mode, (format_mask(mask, "vmware"),) if mask else (), migration,
                    draw(st.integers(0, 2**32 - 1)))

    return build()
