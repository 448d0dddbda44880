"""`lorafleet bench throughput --quick` end to end: real stacks (registry, vLLM-CPU
rollout, trainer, scheduler as processes), three arms, the JSON it writes.

The quick config runs N = 1, 2 with 3 short steps per experiment, and the
lorafleet arms in two rounds (as the full run does); its time is mostly three stack
starts (the unmeasured warm-up and one per experiment; 20-60 s each on 2 cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ARMS = ("single_tenant_cold", "single_tenant_warm", "lorafleet")
# Three stack starts of up to ~60 s, seven experiments of a few seconds, three
# teardowns; generous for a loaded machine, far below the suite's per-test timeout.
TIMEOUT_S = 540


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli.main", "bench", "throughput", "--quick",
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert out.with_suffix(".png").stat().st_size > 0
    assert "experiment throughput" in proc.stdout
    assert "the first experiment finished at" in proc.stdout
    assert "the unmeasured warm-up stack started in" in proc.stdout
    return {"json": json.loads(out.read_text()), "stdout": proc.stdout}


def test_top_level_keys(quick_run: dict) -> None:
    result = quick_run["json"]
    assert result["quick"] is True
    n = result["config"]["n"]
    assert len(n) >= 2 and result["n_max"] == max(n)
    assert _positive(result["speedup_vs_single_tenant_cold"])
    assert _positive(result["speedup_vs_single_tenant_warm"])
    gap = result["quality_gap_max"]
    assert isinstance(gap, float | int) and 0 <= gap <= 1
    assert isinstance(result["warm_experiment_at_least_cold_start"], bool)
    assert _positive(result["min_warm_experiment_s"])
    # One cold start per experiment of the largest N, after an unmeasured one.
    starts = result["cold_start_s"]["each"]
    assert len(starts) == result["n_max"] and all(_positive(s) for s in starts)
    assert result["config"]["warmup_stack"] is True
    assert _positive(result["warmup_start_s"])
    # The check's boolean is the comparison of the two recorded numbers.
    assert result["warm_experiment_at_least_cold_start"] == (
        result["min_warm_experiment_s"] >= result["cold_start_s"]["max"]
    )
    assert set(result["speedups"]) == {str(x) for x in n}


def test_machine_records_the_allocator(quick_run: dict) -> None:
    from lorafleet.rollout.allocator import find_tcmalloc

    library = find_tcmalloc()
    assert quick_run["json"]["machine"]["tcmalloc"] == library
    # The report warns exactly when the engine ran without it.
    assert ("tcmalloc was not found" in quick_run["stdout"]) == (library is None)


def test_every_arm_completed_every_experiment(quick_run: dict) -> None:
    result = quick_run["json"]
    assert result["all_completed"] is True
    steps = result["config"]["experiments"]["steps"]
    rounds = result["config"]["concurrent_rounds"]
    assert rounds == 2  # tiny.toml: the smoke run covers several rounds
    for arm in ARMS:
        assert set(result["arms"][arm]) == {str(x) for x in result["config"]["n"]}
        for n, summary in result["arms"][arm].items():
            experiments = summary["experiments"]
            # Each round of the lorafleet arm runs the whole set again.
            arm_rounds = rounds if arm == "lorafleet" else 1
            assert summary["rounds"] == arm_rounds, arm
            assert summary["n"] == int(n), arm
            assert summary["completed"] == int(n) * arm_rounds == len(experiments), arm
            # The same experiments, in the same order, in every arm and round.
            assert [e["index"] for e in experiments] == list(range(int(n))) * arm_rounds
            assert [e["round_index"] for e in experiments] == [
                r for r in range(arm_rounds) for _ in range(int(n))]
            for e in experiments:
                assert e["state"] == "completed", (arm, n, e)
                assert e["steps"] == steps
                assert e["final_accuracy"] is not None and 0 <= e["final_accuracy"] <= 1


def test_numbers_are_finite_and_positive(quick_run: dict) -> None:
    result = quick_run["json"]
    for arm in ARMS:
        for summary in result["arms"][arm].values():
            for key in ("makespan_s", "experiments_per_hour", "mean_completion_s",
                        "p95_completion_s", "rollout_tokens_per_s", "trainer_tokens_per_s",
                        "mean_step_s"):
                assert _positive(summary[key]), (arm, key, summary[key])
            assert summary["p95_completion_s"] >= summary["mean_completion_s"] - 1e-6
            for phase in ("rollout", "train", "publish"):
                assert _positive(summary["phase_s"][phase]), (arm, phase)
            for e in summary["experiments"]:
                assert _positive(e["completion_s"]) and e["rollout_tokens"] > 0
    # Only the cold arm pays stack starts, and its experiments' times include them.
    for summary in result["arms"]["single_tenant_cold"].values():
        for e in summary["experiments"]:
            assert _positive(e["stack_start_s"]) and e["completion_s"] > e["stack_start_s"]
    for arm in ("single_tenant_warm", "lorafleet"):
        for summary in result["arms"][arm].values():
            assert summary["phase_s"]["stack_start"] == 0


def test_arms_share_specs_and_seeds(quick_run: dict) -> None:
    result = quick_run["json"]
    n = result["n_max"]
    cold, warm = (result["arms"][arm][str(n)]["experiments"] for arm in ARMS[:2])
    lorafleet = result["arms"]["lorafleet"][str(n)]["experiments"]
    rounds = [lorafleet[r * n:(r + 1) * n] for r in range(len(lorafleet) // n)]
    for row in zip(cold, warm, *rounds, strict=True):
        assert len({e["task"] for e in row}) == 1
        assert len({e["seed"] for e in row}) == 1
        # Every arm and round runs its own experiment on the scheduler.
        assert len({e["experiment_id"] for e in row}) == len(row)
    assert len({e["seed"] for e in cold}) == len(cold)


def test_lorafleet_makespan_is_the_mean_of_its_rounds(quick_run: dict) -> None:
    result = quick_run["json"]
    for n, summary in result["arms"]["lorafleet"].items():
        spans = summary["round_makespans_s"]
        assert len(spans) == summary["rounds"] == 2
        assert all(_positive(s) for s in spans)
        assert summary["makespan_s"] == pytest.approx(sum(spans) / len(spans), rel=1e-3)
        # Each round's makespan runs from its submit to its last end; its tail
        # from its first end.
        firsts = []
        for r, span in enumerate(spans):
            ends = [e["completion_s"] for e in summary["experiments"] if e["round_index"] == r]
            assert span == pytest.approx(max(ends), rel=1e-3), n
            firsts.append(min(ends))
        assert summary["first_finish_s"] == pytest.approx(sum(firsts) / len(firsts), rel=1e-3)
        assert 0 <= summary["tail_fraction"] < 1
        for arm in ("single_tenant_cold", "single_tenant_warm"):
            assert result["arms"][arm][n]["first_finish_s"] is None
        speedups = result["speedups"][n]
        warm = result["arms"]["single_tenant_warm"][n]["makespan_s"]
        assert speedups["vs_single_tenant_warm"] == pytest.approx(
            warm / summary["makespan_s"], rel=1e-3)


def test_speedup_sources_multiply_back_to_the_speedups(quick_run: dict) -> None:
    result = quick_run["json"]
    for n, speedups in result["speedups"].items():
        sources = speedups["sources"]
        assert all(_positive(value) for value in sources.values()), (n, sources)
        # (The JSON rounds every number to 4 decimals.)
        vs_warm = sources["cores_busy_gain"] * sources["cpu_per_work_gain"]
        assert vs_warm == pytest.approx(speedups["vs_single_tenant_warm"], rel=2e-3), n
        assert vs_warm * sources["cold_over_warm"] == pytest.approx(
            speedups["vs_single_tenant_cold"], rel=2e-3), n
    assert "where it comes from:" in quick_run["stdout"]


def test_the_ceiling_at_equal_cpu_bounds_what_filling_cores_can_give(quick_run: dict) -> None:
    result = quick_run["json"]
    cores = result["machine"]["usable_cores"]
    assert 1 <= cores <= result["machine"]["cpus"]
    for n, speedups in result["speedups"].items():
        ceiling, sources = speedups["ceiling_at_equal_cpu"], speedups["sources"]
        assert _positive(ceiling["vs_single_tenant_warm"]), (n, ceiling)
        # No arm keeps more cores busy than it may run on, so the measured gain from
        # busier cores never passes the ceiling's.
        warm_busy = result["arms"]["single_tenant_warm"][n]["cpu"]["cores_busy"]
        assert ceiling["vs_single_tenant_warm"] == pytest.approx(cores / warm_busy, rel=2e-3)
        assert sources["cores_busy_gain"] <= ceiling["vs_single_tenant_warm"] * 1.002, n
        assert ceiling["vs_single_tenant_cold"] == pytest.approx(
            ceiling["vs_single_tenant_warm"] * sources["cold_over_warm"], rel=2e-3), n
    assert "ceiling here: with all" in quick_run["stdout"]


def test_cpu_accounting_covers_every_service(quick_run: dict) -> None:
    result = quick_run["json"]
    cpus = result["machine"]["cpus"]
    services = {"registry", "trainer-0", "rollout-0", "scheduler"}
    for arm in ARMS:
        for n, summary in result["arms"][arm].items():
            cpu = summary["cpu"]
            assert set(cpu["by_service_s"]) == services, (arm, n, cpu)
            # The rollout service's tree holds vLLM's engine processes: never idle
            # while experiments generate.
            assert cpu["by_service_s"]["rollout-0"] > 0, (arm, n)
            # (The JSON rounds to 4 decimals.)
            assert cpu["total_s"] == pytest.approx(sum(cpu["by_service_s"].values()), rel=1e-3)
            assert cpu["cores_busy"] == pytest.approx(
                cpu["total_s"] / summary["makespan_s"], rel=1e-3
            )
            # Readings are of real processes: busy, yet within the machine.
            assert 0.05 < cpu["cores_busy"] <= cpus + 0.5, (arm, n, cpu)
    # A cold experiment pays its stack's start-up CPU (model loads, engine
    # warm-up), which the warm arm's experiments do not.
    cold = result["arms"]["single_tenant_cold"]["1"]["cpu"]["total_s"]
    warm = result["arms"]["single_tenant_warm"]["1"]["cpu"]["total_s"]
    assert cold > warm


def test_schedule_interleaves_the_arms(quick_run: dict) -> None:
    """Experiment i runs cold then warm; the concurrent arms, largest N first, run
    in rounds spread over that sequence (round r of R after experiment
    ceil(r N_max / (R + 1)) - 1; with N_max = 2 and R = 2, after each experiment)."""
    result = quick_run["json"]
    n_max, ns = result["n_max"], result["config"]["n"]
    assert (n_max, result["config"]["concurrent_rounds"]) == (2, 2)
    expected = ["warm-up stack"]  # config.warmup_stack, on by default
    for i in range(n_max):
        expected += [f"single_tenant_cold {i}", f"single_tenant_warm {i}"]
        expected += [f"lorafleet N={n} round {i + 1}" for n in sorted(ns, reverse=True)]
    schedule = result["schedule"]
    assert [entry["run"] for entry in schedule] == expected
    for earlier, later in zip(schedule, schedule[1:], strict=False):
        assert 0 <= earlier["from_s"] < earlier["to_s"] <= later["from_s"] + 1e-3
    # Interleaved sequential arms: their makespan is the sum of their times.
    for arm in ("single_tenant_cold", "single_tenant_warm"):
        for summary in result["arms"][arm].values():
            times = [e["completion_s"] for e in summary["experiments"]]
            assert summary["makespan_s"] == pytest.approx(sum(times), rel=1e-3)
