"""minivmm's pytest plugin, loaded through the ``pytest11`` entry point once minivmm is
installed: test your own feature-detection code on emulated CPUs.

Fixtures:
  ``minivmm_run``   run(guest, host="nehalem", evc=None, masks=(), migrations=(), **options) -> RunResult
  ``minivmm_cc``    cc(*sources, cflags=()) -> path of a C guest built with the guest runtime
                    (the test is skipped, saying why, when there is no gcc)
  ``minivmm_cell``  the matrix cell of a test marked ``@pytest.mark.minivmm(...)``

The marker runs a test once per cell of the cross product it names, as ordinary
pytest items (so ``pytest -n auto`` with pytest-xdist spreads them over cores or
machines)::

    @pytest.mark.minivmm(hosts="core2,penryn,nehalem", evc="intel-merom", migrate="all-pairs")
    def test_survives(minivmm_cell, my_guest):
        result = minivmm_cell.run(my_guest)
        assert_survives_migration(result)

Marker arguments are those of :func:`minivmm.matrix.cells`: ``hosts`` ("all" or a
list), ``evc`` (a mode, a list, "all"), ``migrate`` ("all-pairs", "A:B"), ``at``
(``syscall:N`` too for Linux programs), ``masks``, ``seed``, and for a Linux program
``args`` and ``mounts``. Assertion helpers live in :mod:`minivmm.testing`.
"""

from __future__ import annotations

import shutil

import pytest


def pytest_addoption(parser):
    parser.addini("minivmm_timeout", "time budget of each minivmm guest run, in seconds", default="60")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "minivmm(hosts='all', evc=None, migrate=None, at='checkpoint:1', masks=(), seed=0, args=(), "
                   "mounts=()): "
                   "run the test once per minivmm matrix cell; the test takes the minivmm_cell fixture")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("minivmm")
    if marker is None or "minivmm_cell" not in metafunc.fixturenames:
        return
    from .matrix import cells
    if marker.args:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: @pytest.mark.minivmm takes keyword arguments only")
    cell_list = cells(**marker.kwargs)
    metafunc.parametrize("minivmm_cell", cell_list, ids=[c.id for c in cell_list])


def _timeout(config) -> float:
    return float(config.getini("minivmm_timeout"))


class BoundCell:
    """A matrix cell with the session's time budget; ``run(guest)`` runs it."""

    def __init__(self, cell, timeout: float):
        self.cell, self.timeout = cell, timeout

    def __getattr__(self, name):
        return getattr(self.cell, name)

    def __str__(self):
        return self.cell.id

    def run(self, guest: str | None = None, **options):
        options.setdefault("timeout", self.timeout)
        return self.cell.run(str(guest) if guest is not None else None, **options)


@pytest.fixture
def minivmm_cell(request):
    cell = getattr(request, "param", None)
    if cell is None:
        raise pytest.UsageError(f"{request.node.nodeid}: minivmm_cell needs @pytest.mark.minivmm(hosts=..., ...)")
    if cell.skip_reason():
        pytest.skip(cell.skip_reason())
    return BoundCell(cell, _timeout(request.config))


@pytest.fixture
def minivmm_run(request):
    from ..vmm.vm import VM

    def run(guest, host="nehalem", evc=None, masks=(), memory=None, **options):
        options.setdefault("timeout", _timeout(request.config))
        return VM(str(guest), host, memory=memory, evc=evc, masks=masks).run(**options)

    return run


@pytest.fixture(scope="session")
def minivmm_cc():
    from ..errors import MinivmmError
    from ..guests.toolchain import build_c, compiler

    def cc(*sources, cflags=()):
        try:
            compiler()
        except MinivmmError as e:
            pytest.skip(str(e))
        return str(build_c(sources, cflags=cflags))

    return cc


def pytest_report_header(config):
    if not shutil.which("gcc"):
        return "minivmm: no gcc, C guests will be skipped"
    return None
