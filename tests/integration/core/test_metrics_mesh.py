"""Metrics of a real mesh doing RL: registry, a co-located node (trainer + torch
rollout on the project's tiny model) and the scheduler as processes, each with a
metrics endpoint; two experiments run concurrently, then the scrapes must show
their steps, phases and rewards (scheduler), fused passes, tokens and memory
loads (node), and by-reference publishes (registry)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from metrics_scrape import read_metrics_port, sample, scrape

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.client import SchedulerClient, builtin_spec
from lorafleet.cluster.local import LocalCluster, ServiceSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

NODE_ID = "node-m"
STEPS = 2
EXPERIMENTS = ("mesh-count", "mesh-copy")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, tiny_model_dir: Path):
    run_dir = tmp_path_factory.mktemp("metrics-mesh")
    cache = run_dir / "node-cache"
    cache.mkdir()
    cluster = LocalCluster(run_dir)
    try:
        registry = cluster.start_and_wait(
            ServiceSpec(
                "registry",
                "registry",
                {
                    "LORAFLEET_REGISTRY_METRICS_PORT": "0",
                    "LORAFLEET_REGISTRY_FILE_ROOTS": json.dumps({NODE_ID: str(cache)}),
                },
            )
        )
        node = cluster.start_and_wait(
            ServiceSpec(
                "node",
                "node",
                {
                    "LORAFLEET_NODE_METRICS_PORT": "0",
                    "LORAFLEET_NODE_MODEL_PATH": str(tiny_model_dir),
                    "LORAFLEET_NODE_REGISTRY_ADDRESS": registry,
                    "LORAFLEET_NODE_NODE_ID": NODE_ID,
                    "LORAFLEET_NODE_ADAPTER_CACHE_DIR": str(cache),
                    "LORAFLEET_NODE_MAX_RANK": "8",
                    "LORAFLEET_NODE_MAX_LORA_RANK": "8",
                    "LORAFLEET_NODE_TORCH_THREADS": "1",
                    # Both experiments' train steps land within this window.
                    "LORAFLEET_NODE_FUSE_MAX_WAIT_MS": "200",
                },
            ),
            timeout_s=240,
        )
        static_node = {
            "node_id": NODE_ID,
            "rollout_address": node,
            "trainer_address": node,
            "base_model": "tiny",
            "slots": 4,
            "max_rank": 8,
        }
        cluster.start_and_wait(
            ServiceSpec(
                "scheduler",
                "scheduler",
                {
                    "LORAFLEET_SCHEDULER_METRICS_PORT": "0",
                    "LORAFLEET_SCHEDULER_REGISTRY_ADDRESS": registry,
                    "LORAFLEET_SCHEDULER_NODES": json.dumps([static_node]),
                },
            )
        )
    except BaseException:
        cluster.stop_all()
        raise
    yield cluster
    cluster.stop_all(timeout_s=60)


def _run_experiments(cluster: LocalCluster) -> None:
    with SchedulerClient(cluster.services["scheduler"].address) as client:
        for i, name in enumerate(EXPERIMENTS):
            spec = builtin_spec(
                name.removeprefix("mesh-"),
                rank=4,
                max_steps=STEPS,
                prompts_per_step=4,
                group_size=4,
                eval_prompts=8,
                seed=i,
            )
            client.submit(spec, experiment_id=name)
        deadline = time.monotonic() + 300
        while True:
            experiments = [client.get(name) for name in EXPERIMENTS]
            if all(e.state == pb.EXPERIMENT_STATE_COMPLETED for e in experiments):
                return
            failed = [e for e in experiments if e.state == pb.EXPERIMENT_STATE_FAILED]
            assert not failed, [e.state_reason for e in failed]
            states = [pb.ExperimentState.Name(e.state) for e in experiments]
            assert time.monotonic() < deadline, states
            time.sleep(0.5)


def test_metrics_follow_the_rl_loop(mesh):
    _run_experiments(mesh)
    scheduler = scrape(read_metrics_port(mesh.services["scheduler"].log_path))
    node = scrape(read_metrics_port(mesh.services["node"].log_path))
    registry = scrape(read_metrics_port(mesh.services["registry"].log_path))

    for name in EXPERIMENTS:
        e = {"experiment": name}
        assert sample(scheduler, "lorafleet_experiment_steps_total", **e) == STEPS
        assert sample(scheduler, "lorafleet_experiment_step_seconds_count", **e) == STEPS
        for phase in ("rollout", "reward", "train", "publish"):
            assert (
                sample(scheduler, "lorafleet_experiment_phase_seconds_count", phase=phase, **e)
                == STEPS
            ), phase
            assert sample(scheduler, "lorafleet_experiment_phase_seconds_sum", phase=phase, **e) > 0
        assert sample(scheduler, "lorafleet_experiment_adapter_version", **e) == STEPS + 1
        assert sample(scheduler, "lorafleet_experiment_rollout_tokens_total", **e) > 0
        assert (scheduler.get(("lorafleet_experiment_reward_mean", frozenset(e.items())))
                is not None)
    assert (
        sample(scheduler, "lorafleet_scheduler_experiments_finished_total", state="COMPLETED")
        == len(EXPERIMENTS)
    )
    assert sample(scheduler, "lorafleet_scheduler_experiments", state="RUNNING") == 0
    # Both adapters were dropped when their experiments completed.
    assert sample(scheduler, "lorafleet_scheduler_node_slots_used", node=NODE_ID) == 0
    assert sample(scheduler, "lorafleet_scheduler_node_slots_total", node=NODE_ID) == 4

    train = {"kind": "train_step"}
    passes = sample(node, "lorafleet_trainer_fused_batch_adapters_count", **train)
    adapters = sample(node, "lorafleet_trainer_fused_batch_adapters_sum", **train)
    # Every step of every experiment trained once (whether the two experiments'
    # steps met in one pass depends on timing; the trainer tests pin fusing down).
    assert adapters == len(EXPERIMENTS) * STEPS
    assert 1 <= passes <= adapters
    assert sample(node, "lorafleet_trainer_tokens_total", **train) > 0
    assert sample(node, "lorafleet_rollout_completion_tokens_total", kind="adapter") > 0
    # Version 1 (untrained) + one per step, each handed over and served from memory.
    versions = len(EXPERIMENTS) * (STEPS + 1)
    assert sample(node, "lorafleet_node_memory_handovers_total") == versions
    assert sample(node, "lorafleet_trainer_checkpoint_seconds_count", op="save_version") == versions
    memory_loads = sum(
        value
        for (name, labels), value in node.items()
        if name == "lorafleet_rollout_adapter_load_seconds_count"
        and dict(labels).get("source") == "memory"
    )
    assert memory_loads >= 1
    assert sample(node, "lorafleet_node_process_pss_bytes") > 0

    assert (
        sample(registry, "lorafleet_registry_publishes_total", mode="reference", code="OK")
        == versions
    )
