"""The throughput benchmark's rounds of the lorafleet arms (`concurrent_rounds`):
where they run in the sequence and how their numbers combine. The end-to-end run
is tests/e2e/test_bench_throughput.py; these are its pure parts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import ValidationError

from lorafleet.cli.bench_cmd import BENCHMARKS_DIR, _load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_script("throughput")


def _outcome(bench: ModuleType, index: int, round_index: int, completion_s: float,
             rollout_tokens: int) -> object:
    return bench.Outcome(
        arm="lorafleet", index=index, experiment_id=f"e{round_index}-{index}", task="add",
        seed=index, state="completed", state_reason="", steps=10, base_accuracy=0.1,
        final_accuracy=0.5, started_at=100.0, end_at=100.0 + completion_s, stack_start_s=0.0,
        queue_wait_s=0.0,
        phases_s={"rollout": 6.0, "reward": 0.5, "train": 2.0, "publish": 1.0, "queue_wait": 0.0},
        steps_s=9.5, rollout_tokens=rollout_tokens, train_tokens=rollout_tokens // 2,
        mean_fused_adapters=0.0, round_index=round_index,
    )


@pytest.mark.parametrize("n_max", range(1, 11))
def test_one_round_runs_in_the_middle_as_before(bench: ModuleType, n_max: int) -> None:
    assert bench.round_positions(n_max, 1) == [math.ceil(n_max / 2) - 1]


def test_rounds_spread_over_the_sequence(bench: ModuleType) -> None:
    assert bench.round_positions(8, 2) == [2, 5]
    assert bench.round_positions(2, 2) == [0, 1]
    assert bench.round_positions(8, 3) == [1, 3, 5]
    # More rounds than experiments: they share positions and run back to back.
    assert bench.round_positions(1, 3) == [0, 0, 0]
    for n_max in range(1, 12):
        for rounds in range(1, 6):
            positions = bench.round_positions(n_max, rounds)
            assert positions == sorted(positions)
            assert all(0 <= p < n_max for p in positions)


def test_summary_of_two_rounds_is_per_round(bench: ModuleType) -> None:
    # Round 1 took 20 s, round 2 took 30 s: mean 25 s.
    outcomes = [_outcome(bench, i, 0, c, 1000) for i, c in enumerate((15.0, 20.0))]
    outcomes += [_outcome(bench, i, 1, c, 1000) for i, c in enumerate((25.0, 30.0))]
    summary = bench.arm_summary(outcomes, 25.0, round_makespans_s=[20.0, 30.0])
    assert summary["n"] == 2 and summary["rounds"] == 2 and summary["completed"] == 4
    assert summary["makespan_s"] == 25.0
    assert summary["round_makespans_s"] == [20.0, 30.0]
    assert summary["experiments_per_hour"] == pytest.approx(2 / 25.0 * 3600)
    # Tokens, steps and phase times are one round's worth, so the rates compare
    # with a one-round arm's.
    assert summary["rollout_tokens"] == 2000
    assert summary["rollout_tokens_per_s"] == pytest.approx(2000 / 25.0)
    assert summary["trainer_tokens_per_s"] == pytest.approx(1000 / 25.0)
    assert summary["steps"] == 20
    assert summary["phase_s"]["rollout"] == pytest.approx(12.0)
    assert summary["mean_step_s"] == pytest.approx(0.95)
    assert summary["mean_completion_s"] == pytest.approx(22.5)
    # The first finishes of the rounds (15 s, 25 s), averaged, and the share of
    # the makespan after it.
    assert summary["first_finish_s"] == pytest.approx(20.0)
    assert summary["tail_fraction"] == pytest.approx(1 - 20.0 / 25.0)
    # Shares of one round's summed experiment time (45 s), not of both rounds'.
    assert summary["phase_fraction"]["rollout"] == pytest.approx(12.0 / 45.0, rel=1e-3)
    assert len(summary["experiments"]) == 4


def test_summary_of_one_round_is_unchanged(bench: ModuleType) -> None:
    outcomes = [_outcome(bench, i, 0, c, 1000) for i, c in enumerate((15.0, 20.0))]
    summary = bench.arm_summary(outcomes, 20.0)
    assert (summary["n"], summary["rounds"], summary["completed"]) == (2, 1, 2)
    assert summary["round_makespans_s"] == [20.0]
    assert summary["rollout_tokens"] == 2000
    assert summary["rollout_tokens_per_s"] == pytest.approx(100.0)
    assert summary["experiments_per_hour"] == pytest.approx(360.0)


def test_one_after_another_has_no_first_finish(bench: ModuleType) -> None:
    outcomes = [
        dataclasses.replace(_outcome(bench, i, 0, c, 1000), arm="single_tenant_warm")
        for i, c in enumerate((15.0, 20.0))
    ]
    summary = bench.arm_summary(outcomes, 35.0)
    assert summary["first_finish_s"] is None and summary["tail_fraction"] is None


def test_cpu_of_rounds_is_their_mean(bench: ModuleType) -> None:
    readings = [
        ({"rollout-0": 10.0, "trainer-0": 5.0}, {"rollout-0": 30.0, "trainer-0": 15.0}),
        ({"rollout-0": 30.0, "trainer-0": 15.0}, {"rollout-0": 70.0, "trainer-0": 35.0}),
    ]
    cpu = bench.mean_round_cpu(readings, 25.0)
    assert cpu["by_service_s"] == {"rollout-0": 30.0, "trainer-0": 15.0}
    assert cpu["total_s"] == pytest.approx(45.0)
    assert cpu["cores_busy"] == pytest.approx(45.0 / 25.0)


def test_tiny_config_runs_two_rounds_in_full_and_quick(bench: ModuleType) -> None:
    path = Path(BENCHMARKS_DIR) / "configs" / "tiny.toml"
    assert bench.load_config(path, quick=False).concurrent_rounds == 2
    assert bench.load_config(path, quick=True).concurrent_rounds == 2


def test_rounds_must_be_positive(bench: ModuleType) -> None:
    with pytest.raises(ValidationError):
        bench.BenchConfig(concurrent_rounds=0)
    assert bench.BenchConfig().concurrent_rounds == 1
