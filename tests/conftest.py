import pytest
from hypothesis import HealthCheck, settings

from minivmm.vmm.vm import VM

# A fast default for development; --hypothesis-profile=ci explores more.
settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


@pytest.fixture
def asm_guest(tmp_path):
    """Write assembly source to a file and return its path."""
    counter = iter(range(1000))

    def make(source: str, name: str | None = None) -> str:
        path = tmp_path / (name or f"guest{next(counter)}.asm")
        path.write_text(source)
        return str(path)

    return make


@pytest.fixture
def run_asm(asm_guest):
    def run(source: str, host: str = "nehalem", **options):
        timeout = options.pop("timeout", 10)
        return VM(asm_guest(source), host, **options).run(timeout=timeout)

    return run
