import pytest

from minivmm.vm import VM

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


