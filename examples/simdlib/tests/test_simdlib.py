"""simdlib's detection, tested on emulated CPUs with minivmm's pytest plugin."""

import pytest

from minivmm.testing import assert_finishes, assert_follows_cpuid, assert_same_run, assert_survives_migration

GENERATIONS = "core2,penryn,nehalem,westmere,sandybridge,opteron-g3"


@pytest.mark.minivmm(hosts=GENERATIONS)
def test_paths_follow_cpuid_on_every_generation(minivmm_cell, simdlib):
    result = minivmm_cell.run(simdlib)
    assert_finishes(result)
    assert_follows_cpuid(result)


@pytest.mark.minivmm(hosts="core2,penryn,nehalem", evc="intel-merom")
def test_paths_follow_the_evc_baseline(minivmm_cell, simdlib):
    assert_follows_cpuid(minivmm_cell.run(simdlib))


@pytest.mark.minivmm(hosts="core2,penryn,nehalem", evc="intel-merom", migrate="all-pairs")
def test_survives_live_migration_in_an_intel_merom_cluster(minivmm_cell, simdlib):
    result = minivmm_cell.run(simdlib)
    assert_survives_migration(result)
    assert_follows_cpuid(result)


def test_every_path_computes_the_same_result(minivmm_run, simdlib):
    fast, slow = minivmm_run(simdlib, "nehalem"), minivmm_run(simdlib, "core2")
    assert fast.detections["sse4_1"].uses == "sse4_1" and slow.detections["sse4_1"].uses == "generic"
    assert fast.console.splitlines()[-1] == slow.console.splitlines()[-1]


def test_migration_is_invisible_to_the_guest(minivmm_run, simdlib):
    moved = minivmm_run(simdlib, "penryn", evc="intel-merom", migrations=["core2@checkpoint:1"])
    assert_same_run(moved, minivmm_run(simdlib, "penryn", evc="intel-merom"))
