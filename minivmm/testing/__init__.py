"""Testing guest detection code with minivmm: assertion helpers (:mod:`.checks`),
hypothesis strategies (:mod:`.strategies`), and the pytest plugin's fixtures and
marker (:mod:`minivmm.testing.plugin`, loaded automatically once minivmm is installed)."""

from .checks import (assert_finishes, assert_follows_cpuid, assert_no_hidden_instructions, assert_same_run,
                     assert_survives_migration, audit_problems, detection_problems, migration_problems, stop_problems)

__all__ = ["assert_finishes", "assert_follows_cpuid", "assert_no_hidden_instructions", "assert_same_run",
           "assert_survives_migration", "audit_problems", "detection_problems", "migration_problems",
           "stop_problems"]
