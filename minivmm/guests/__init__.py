"""Guests: the images minivmm loads (assembly, flat binaries, ELF64; C guests built
with the shipped runtime) and the guests it ships (``shipped/``)."""

from importlib import resources

LOAD_ADDRESS = 0x100000           # docs/abi.md: where assembly and flat images load


def shipped_guests_dir():
    """The shipped guests, also the system include path of assembly sources."""
    return resources.files("minivmm").joinpath("guests", "shipped")
