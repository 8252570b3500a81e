import collections
import functools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from minivmm.vmm.vm import VM

# A fast default for development; --hypothesis-profile=ci explores more.
settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")

# Outcomes of tests/test_fuzz.py per reader, printed at the end of the run.
FUZZ_OUTCOMES = collections.defaultdict(collections.Counter)
FUZZ_MESSAGES = collections.Counter()   # protocol messages a reader took in, per reader


def pytest_terminal_summary(terminalreporter):
    if not FUZZ_OUTCOMES:
        return
    import resource
    write = terminalreporter.write_line
    write("fuzzing: inputs tried per reader (this process)")
    write(f"{'reader':<14}{'tried':>8}{'accepted':>10}{'refused':>9}{'traceback':>11}{'hang':>6}")
    for reader, counts in sorted(FUZZ_OUTCOMES.items()):
        write(f"{reader:<14}{sum(counts.values()):>8}{counts['accepted']:>10}{counts['refused']:>9}"
              f"{counts['traceback']:>11}{counts['hang']:>6}")
    for reader, count in sorted(FUZZ_MESSAGES.items()):
        write(f"{reader}: {count} messages read")
    write(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


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


# ---- every report the tests produce is validated against docs/report.schema.json ----

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "report.schema.json"


@functools.cache
def report_validator():
    import jsonschema
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(autouse=True, scope="session")
def _reports_follow_the_schema():
    """Every RunResult any test makes is checked against the schema, in JSON form."""
    from minivmm.vmm import vm as vm_module
    original = vm_module._Run._result

    def checked(self):
        result = original(self)
        report_validator().validate(json.loads(json.dumps(result.to_dict())))
        return result

    vm_module._Run._result = checked
    yield
    vm_module._Run._result = original
