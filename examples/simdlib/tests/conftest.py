from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def pytest_addoption(parser):
    parser.addoption("--simdlib-detect", choices=("cpuid", "probe"), default="cpuid",
                     help="build simdlib with this detection (probe is the broken one)")


@pytest.fixture(scope="session")
def simdlib(minivmm_cc, request):
    """The test guest linked with simdlib, as a static ELF for minivmm."""
    detect = request.config.getoption("--simdlib-detect")
    return minivmm_cc(SRC / "guest.c", SRC / "simd.c", SRC / f"detect_{detect}.c", cflags=(f"-I{SRC}",))
