"""The throughput benchmark's split of a speedup into where it comes from
(`speedup_sources`): factors that multiply back to the makespan ratios."""

from __future__ import annotations

from types import ModuleType

import pytest

from lorafleet.cli.bench_cmd import _load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_script("throughput")


def _arm(bench: ModuleType, makespan_s: float, cpu_s: float) -> dict:
    return {"makespan_s": makespan_s,
            "cpu": bench.cpu_used({}, {"rollout-0": cpu_s * 0.6, "trainer-0": cpu_s * 0.4},
                                  makespan_s)}


def test_the_factors_multiply_back_to_both_speedups(bench: ModuleType) -> None:
    # Numbers of a real full run (N=8): 549.9 / 371.2 / 213.5 s, 607 / 413 / 389 CPU-s.
    cold, warm, concurrent = (_arm(bench, 549.9, 607.0), _arm(bench, 371.2, 413.0),
                              _arm(bench, 213.5, 389.0))
    sources = bench.speedup_sources(cold, warm, concurrent)

    assert sources["cores_busy_gain"] == pytest.approx((389.0 / 213.5) / (413.0 / 371.2))
    assert sources["cpu_per_work_gain"] == pytest.approx(413.0 / 389.0)
    assert sources["cold_over_warm"] == pytest.approx(549.9 / 371.2)
    vs_warm = sources["cores_busy_gain"] * sources["cpu_per_work_gain"]
    assert vs_warm == pytest.approx(371.2 / 213.5)
    assert vs_warm * sources["cold_over_warm"] == pytest.approx(549.9 / 213.5)


def test_sharing_that_costs_cpu_shows_as_a_factor_below_one(bench: ModuleType) -> None:
    # At once the work took more CPU than one after another; the whole gain
    # (and more) came from busier cores.
    sources = bench.speedup_sources(_arm(bench, 300.0, 330.0), _arm(bench, 200.0, 220.0),
                                    _arm(bench, 125.0, 242.0))

    assert sources["cpu_per_work_gain"] == pytest.approx(220.0 / 242.0)
    assert sources["cpu_per_work_gain"] < 1 < sources["cores_busy_gain"]


def test_missing_cpu_readings_give_no_factor_rather_than_a_wrong_one(
        bench: ModuleType) -> None:
    cold, warm = _arm(bench, 300.0, 330.0), _arm(bench, 200.0, 220.0)
    sources = bench.speedup_sources(cold, warm, {"makespan_s": 0.0, "cpu": {}})

    assert sources["cores_busy_gain"] is None
    assert sources["cpu_per_work_gain"] is None
    assert sources["cold_over_warm"] == pytest.approx(1.5)


def test_the_ceiling_fills_every_core_at_the_cpu_of_one_after_another(
        bench: ModuleType) -> None:
    # Warm: 413 CPU-s in 371.2 s = 1.11 cores busy; on 2 cores filling them is worth
    # at most 2 / 1.11, and the cold starts multiply that.
    cold, warm = _arm(bench, 549.9, 607.0), _arm(bench, 371.2, 413.0)
    ceiling = bench.ceiling_at_equal_cpu(cold, warm, cores=2)

    assert ceiling["vs_single_tenant_warm"] == pytest.approx(2 / (413.0 / 371.2))
    assert ceiling["vs_single_tenant_cold"] == pytest.approx(
        ceiling["vs_single_tenant_warm"] * 549.9 / 371.2)
    # A run that kept both cores busy and used the warm arm's CPU sits exactly on it.
    on_it = _arm(bench, 413.0 / 2, 413.0)
    sources = bench.speedup_sources(cold, warm, on_it)
    assert sources["cores_busy_gain"] * sources["cold_over_warm"] == pytest.approx(
        ceiling["vs_single_tenant_cold"])
    assert bench.ceiling_at_equal_cpu(cold, {"makespan_s": 371.2}, cores=2) == {
        "vs_single_tenant_warm": None, "vs_single_tenant_cold": None}
