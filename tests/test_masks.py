"""The mask algebra and every mask format, by example and by property."""

import re

import pytest
from hypothesis import assume, find, given
from hypothesis import strategies as st

from minivmm.cpu.deps import hidden_closure, requirements
from minivmm.cpu.features import catalogue
from minivmm.cpu.profiles import builtin_profiles, load_profile
from minivmm.errors import MinivmmError
from minivmm.masking.formats import format_mask, parse_mask
from minivmm.masking.mask import Mask, RegisterMask
from minivmm.masking.view import GuestCpuidView
from minivmm.testing import strategies as mst

SSE4_1 = 1 << 19


def same_answers(a, b):
    keys = set(a) | set(b)
    return all(a.query(*k) == b.query(*k) for k in keys)


# ---- the algebra ---------------------------------------------------------------------

def test_modifier_is_firecrackers_filter_value_pair():
    m = RegisterMask(filter=0b1100, value=0b0100)
    assert m.apply(0b1011) == 0b0111


def test_value_outside_filter_is_rejected():
    with pytest.raises(ValueError):
        RegisterMask(filter=0b01, value=0b10)


@given(mst.profiles(include_dumps=True), mst.masks(marks=True))
def test_apply_is_idempotent(profile, mask):
    once = mask.apply(profile.cpuid)
    assert same_answers(mask.apply(once), once)


@given(mst.profiles(), mst.masks(marks=True), mst.masks(marks=True))
def test_composing_then_applying_equals_applying_in_turn(profile, a, b):
    assert same_answers(a.then(b).apply(profile.cpuid), b.apply(a.apply(profile.cpuid)))


@given(mst.masks(marks=True), mst.masks(marks=True), mst.masks(marks=True))
def test_composition_is_associative(a, b, c):
    assert a.then(b).then(c) == a.then(b.then(c))


@given(mst.profiles(include_dumps=True), mst.hiding_masks())
def test_a_mask_of_0_and_x_never_shows_a_feature_the_host_lacks(profile, mask):
    view = GuestCpuidView(profile.cpuid, mask)
    assert catalogue().decode(view.masked) <= catalogue().decode(profile.cpuid)


def test_negative_control_a_mask_with_1s_can_show_what_the_host_lacks():
    """The property above is not vacuous: drop the 0/x restriction and it breaks."""
    core2 = load_profile("core2")
    found = find(mst.masks(), lambda m: not catalogue().decode(m.apply(core2.cpuid)) <= core2.physical | {
        "osxsave", "ospke", "hypervisor"})
    assert found


@given(st.frozensets(mst.feature_names(levelled_only=False)), st.frozensets(mst.feature_names(levelled_only=False)))
def test_dependency_closure_is_monotone_extensive_and_idempotent(a, b):
    assert a <= hidden_closure(a)
    assert hidden_closure(hidden_closure(a)) == hidden_closure(a)
    assert hidden_closure(a) <= hidden_closure(a | b)


def test_hiding_xsave_hides_the_avx_family():
    hidden = hidden_closure({"xsave"})
    assert {"avx", "avx2", "fma", "avx512f", "avx512bw", "xsaveopt"} <= hidden
    assert "sse4_2" not in hidden
    assert requirements()["avx2"] == {"avx"}


# ---- formats -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", mst.FORMATS)
@given(data=st.data())
def test_format_round_trips_are_exact(fmt, data):
    mask = data.draw(mst.masks_for_format(fmt))
    text = format_mask(mask, fmt)
    assert parse_mask(text) == mask if text else not mask
    if text:
        assert format_mask(parse_mask(text), fmt) == text


@pytest.mark.parametrize("src, dst", [(a, b) for a in ("firecracker", "xen", "vmware") for b in ("firecracker", "xen", "vmware")])
@given(data=st.data())
def test_conversion_between_formats_is_exact_both_ways(src, dst, data):
    mask = data.draw(mst.masks_for_format("firecracker"))  # writable in all three
    assume(mask)
    converted = format_mask(parse_mask(format_mask(mask, src)), dst)
    assert parse_mask(format_mask(parse_mask(converted), src)) == mask


def test_spec_examples_mean_the_same_bit():
    firecracker = parse_mask("0x1:ecx=0bxxxxxxxxxxxx0xxxxxxxxxxxxxxxxxxx")
    xen = parse_mask("1:ecx=xxxxxxxxxxxx0xxxxxxxxxxxxxxxxxxx")
    features = parse_mask("-sse4_1")
    assert firecracker == xen == features
    assert firecracker.registers[(1, 0, "ecx")] == RegisterMask(SSE4_1, 0)
    vmware = parse_mask("cpuid.1.ecx=----:----:---0:----:----:----:----:----")
    assert vmware.features()[1] == {"sse4_2"}


def test_firecracker_short_strings_pad_with_x_and_allow_underscores():
    assert parse_mask("0x1:ecx=0b0000_0") == parse_mask("0x1:ecx=0b" + "x" * 27 + "00000")


def test_firecracker_template_json(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": '
                    '[{"register": "ecx", "bitmap": "0bxxxxxxxxxxxx0xxxxxxxxxxxxxxxxxxx"}]}], "msr_modifiers": []}')
    assert parse_mask(str(path)) == parse_mask("-sse4_1")


def test_vmware_marks():
    m = parse_mask("cpuid.80000001.ecx=----:----:----:----:----:----:----:-TRH")
    reg = m.registers[(0x80000001, 0, "ecx")]
    assert (reg.must_one, reg.filter, reg.value, reg.must_match) == (0b100, 0b010, 0, 0b011)
    with pytest.raises(MinivmmError, match="cannot be written in the Firecracker format"):
        format_mask(m, "firecracker")
    assert parse_mask(format_mask(m, "vmware")) == m


def test_xen_k_is_vmware_h():
    assert parse_mask("1:ecx=" + "x" * 31 + "k") == parse_mask("cpuid.1.ecx=----:----:----:----:----:----:----:---H")


def test_subleaves_in_every_format():
    a = parse_mask("0x7,0x1:eax=0b" + "x" * 26 + "0xxxx")
    assert list(a.registers) == [(7, 1, "eax")]
    assert parse_mask(format_mask(a, "xen")) == parse_mask(format_mask(a, "vmware")) == a


def test_evc_mask_is_the_modes_features():
    shown = catalogue().decode(GuestCpuidView.for_host(load_profile("haswell"), "intel-penryn").table)
    assert "sse4_1" in shown and not {"sse4_2", "popcnt", "avx", "avx2"} & shown


@pytest.mark.parametrize("spec, message", [
    ("cpuid.1.ecx=----:----:---Q:----:----:----:----:----", "bad character 'Q' at position 26"),
    ("cpuid.1.ecx=----:----:----", "8 groups of 4 bits"),
    ("cpuid.1.exx=----:----:----:----:----:----:----:----", "unknown register 'exx'"),
    ("1:ecx=xxxxxxxxxxxx0xxxxxxxxxxxxxxxxxxz", "bad character 'z' at position 38"),
    ("1:ecx=xxxx", "4 bit characters at position 7"),
    ("0x1:ecx=0bxx2x", "bad character '2' at position 13"),
    ("0x1:ecx=0b" + "x" * 33, "33 bits"),
    ("-sse4_1,popcnt", "item 2 'popcnt' must start with + or -"),
    ("-sse41x", "unknown CPU feature 'sse41x'"),
    ("-popcount", "did you mean popcnt"),
    ("evc:intel-penrin", "did you mean intel-penryn"),
    ("zz:ecx=0b0", "leaf 'zz' is not a number"),
    ("", "empty CPUID mask"),
])
def test_parsers_reject_garbage_naming_the_position(spec, message):
    with pytest.raises(MinivmmError, match=re.escape(message)):
        parse_mask(spec)


@given(st.text(max_size=60))
def test_parser_fuzz_never_crashes(text):
    try:
        parse_mask(text)
    except MinivmmError:
        pass


def test_bad_template_files_are_refused(tmp_path):
    for content, message in (("{", "not valid JSON"), ('{"cpuid_modifiers": [{"leaf": "0x1"}]}', "needs leaf"),
                             ('{"cpuid_modifiers": [{"leaf": "0x1", "modifiers": [{"register": "ecx", '
                              '"bitmap": "xx"}]}]}', "starting with 0b")):
        path = tmp_path / "t.json"
        path.write_text(content)
        with pytest.raises(MinivmmError, match=message):
            parse_mask(str(path))


ALL_FORMATS = ("firecracker", "vmware", "xen", "features")


@given(mask=st.one_of(*(mst.masks_for_format(f) for f in ALL_FORMATS), mst.masks(marks=True), mst.feature_masks()),
       src=st.sampled_from(ALL_FORMATS), dst=st.sampled_from(ALL_FORMATS))
def test_every_mask_converts_exactly_between_formats_or_refuses_saying_why(mask, src, dst):
    """Written in SRC, converted to DST and parsed back: the same effect on every
    built-in profile's table, or a refusal that names what the format cannot say."""
    try:
        text = format_mask(mask, src)
        converted = format_mask(parse_mask(text), dst) if text else ""
    except MinivmmError as e:
        assert any(why in str(e) for why in ("cannot be written", "cannot write", "would also hide")), e
        return
    again = parse_mask(converted) if converted else Mask()
    for host in builtin_profiles():
        assert again.apply(host.cpuid) == mask.apply(host.cpuid), (host.name, text, converted)


def test_clearing_xsave_alone_is_not_written_as_minus_xsave():
    """A feature list hides dependants: -xsave would hide AVX as well."""
    mask = parse_mask("0x1:ecx=0bxxxxx0" + "x" * 26)
    with pytest.raises(MinivmmError, match="would also hide .*avx"):
        format_mask(mask, "features")
    assert format_mask(parse_mask("-sse4_1"), "features") == "-sse4_1"  # the control: nothing depends on it
