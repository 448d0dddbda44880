"""Prometheus metrics of the scheduler: per experiment and per node, on the
default registry that the service's metrics endpoint serves.

Per-experiment series come from the ``StepMetrics`` every completed step already
produces (the record WatchExperiment streams), handed over in
``Scheduler._on_step``: the control loop is not threaded through with metric
calls, and a metric can never disagree with the stored step.

Cardinality: ``experiment`` is a label because experiments are few at a time,
but a long-lived scheduler sees many come and go; :class:`SchedulerMetrics`
drops the series of finished experiments once more than
``FINISHED_SERIES_KEPT`` newer ones have finished (their history stays in
Prometheus and in the store). Node series are read from the scheduler's live
node table at scrape time, so a removed node disappears with it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lorafleet.api.common.v1 import metrics_pb2
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.scheduler.types import ACTIVE_STATES, TERMINAL_STATES, NodeRecord

FINISHED_SERIES_KEPT = 32
"""Finished experiments whose series stay exported (the most recent ones)."""

PHASES = ("rollout", "reward", "train", "publish")

# RL steps take from ~0.1 s (tiny model on CPU) to minutes (big models, long
# completions); phases are a fraction of that.
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)

STEPS = Counter(
    "lorafleet_experiment_steps_total", "RL steps completed (version published).", ["experiment"]
)
REWARD_MEAN = Gauge(
    "lorafleet_experiment_reward_mean", "Mean reward of the last step's samples.", ["experiment"]
)
REWARD_STD = Gauge(
    "lorafleet_experiment_reward_std", "Reward std of the last step's samples.", ["experiment"]
)
ACCURACY = Gauge(
    "lorafleet_experiment_accuracy",
    "Exact-match rate of the last step's (sampled) completions.",
    ["experiment"],
)
EVAL_ACCURACY = Gauge(
    "lorafleet_experiment_eval_accuracy",
    "Greedy accuracy on the held-out prompts at the last evaluation.",
    ["experiment"],
)
ADAPTER_VERSION = Gauge(
    "lorafleet_experiment_adapter_version", "Adapter version the last step published.",
    ["experiment"],
)
POLICY_LAG = Gauge(
    "lorafleet_experiment_policy_lag_versions",
    "Versions between the last step's oldest sample policy and the version it trained "
    "from (0 = on-policy; bounded by max_staleness).",
    ["experiment"],
)
ROLLOUT_TOKENS = Counter(
    "lorafleet_experiment_rollout_tokens_total", "Tokens generated for the experiment.",
    ["experiment"],
)
ZERO_ADVANTAGE_SAMPLES = Counter(
    "lorafleet_experiment_zero_advantage_samples_total",
    "Samples left out of training because their advantage was 0 (e.g. a group "
    "whose rewards were all equal): they carry no learning signal.",
    ["experiment"],
)
STEP_SECONDS = Histogram(
    "lorafleet_experiment_step_seconds", "Wall time of one RL step.", ["experiment"],
    buckets=_STEP_BUCKETS,
)
PHASE_SECONDS = Histogram(
    "lorafleet_experiment_phase_seconds",
    "Wall time of one phase (rollout, reward, train, publish) of an RL step.",
    ["experiment", "phase"],
    buckets=_STEP_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "lorafleet_experiment_queue_wait_seconds",
    "Time a step waited for its fair-share turn on the node (rollout and train gates).",
    ["experiment"],
    buckets=_WAIT_BUCKETS,
)
PLACEMENT_WAIT_SECONDS = Histogram(
    "lorafleet_scheduler_placement_wait_seconds",
    "Time an experiment waited in QUEUED for a node slot before (re)starting.",
    buckets=_WAIT_BUCKETS,
)
LEADER = Gauge(
    "lorafleet_scheduler_leader",
    "1 while this replica leads (holds the leader lease and drives the experiments), "
    "0 while it stands by.",
)
FINISHED = Counter(
    "lorafleet_scheduler_experiments_finished_total",
    "Experiments that reached a final state (COMPLETED, FAILED, CANCELLED).",
    ["state"],
)

_PER_EXPERIMENT = (
    STEPS, REWARD_MEAN, REWARD_STD, ACCURACY, EVAL_ACCURACY, ADAPTER_VERSION, POLICY_LAG,
    ROLLOUT_TOKENS, ZERO_ADVANTAGE_SAMPLES, STEP_SECONDS, QUEUE_WAIT_SECONDS,
)


def state_label(state: int) -> str:
    """``EXPERIMENT_STATE_RUNNING`` -> ``RUNNING``."""
    return pb.ExperimentState.Name(state).removeprefix("EXPERIMENT_STATE_")


class _Node(Protocol):
    record: NodeRecord
    experiments: set[str]


class SchedulerMetrics:
    """One scheduler's bookkeeping behind the metrics: the state of every
    experiment it knows of (for ``lorafleet_scheduler_experiments``), which
    finished experiments still have series, and where its node table is.

    Called on the event loop; read by the metrics endpoint's thread through
    :class:`_SchedulerCollector`, which only takes copies.
    """

    def __init__(self, nodes: Callable[[], Iterable[_Node]]) -> None:
        self._nodes = nodes
        self._states: dict[str, int] = {}
        self._finished: deque[str] = deque()
        _LIVE.add(self)

    def close(self) -> None:
        _LIVE.discard(self)

    # -- events --------------------------------------------------------------------

    def experiment_state(self, experiment_id: str, state: int) -> None:
        if state in ACTIVE_STATES:
            self._states[experiment_id] = state
            return
        self._states.pop(experiment_id, None)
        # A final state recorded twice (a cancel racing the runner's own end)
        # is one finished experiment.
        if state in TERMINAL_STATES and experiment_id not in self._finished:
            FINISHED.labels(state_label(state)).inc()
            self._retire(experiment_id)

    def placed(self, waited_s: float) -> None:
        PLACEMENT_WAIT_SECONDS.observe(waited_s)

    def step(self, experiment_id: str, m: metrics_pb2.StepMetrics) -> None:
        e = experiment_id
        STEPS.labels(e).inc()
        REWARD_MEAN.labels(e).set(m.reward_mean)
        REWARD_STD.labels(e).set(m.reward_std)
        ACCURACY.labels(e).set(m.accuracy)
        ADAPTER_VERSION.labels(e).set(m.adapter_version)
        POLICY_LAG.labels(e).set(max(0, m.adapter_version - 1 - m.min_policy_version))
        if m.HasField("eval_accuracy"):
            EVAL_ACCURACY.labels(e).set(m.eval_accuracy)
        if m.rollout_tokens:
            ROLLOUT_TOKENS.labels(e).inc(m.rollout_tokens)
        if m.zero_advantage_sequences:
            ZERO_ADVANTAGE_SAMPLES.labels(e).inc(m.zero_advantage_sequences)
        # A step adopted after a crash is rebuilt from the registry without
        # timings: counting zeros would drag every latency down.
        if m.HasField("times") and m.times.step_ms > 0:
            t = m.times
            STEP_SECONDS.labels(e).observe(t.step_ms / 1000)
            QUEUE_WAIT_SECONDS.labels(e).observe(t.queue_wait_ms / 1000)
            for phase, ms in zip(
                PHASES, (t.rollout_ms, t.reward_ms, t.train_ms, t.publish_ms), strict=True
            ):
                PHASE_SECONDS.labels(e, phase).observe(ms / 1000)

    # -- series retention ----------------------------------------------------------

    def _retire(self, experiment_id: str) -> None:
        self._finished.append(experiment_id)
        while len(self._finished) > FINISHED_SERIES_KEPT:
            forget(self._finished.popleft())

    # -- read by the collector (metrics endpoint thread) ---------------------------

    def state_counts(self) -> dict[str, int]:
        counts = {state_label(s): 0 for s in sorted(ACTIVE_STATES)}
        for state in self._states.copy().values():
            counts[state_label(state)] += 1
        return counts

    def node_rows(self) -> list[tuple[str, int, int, bool]]:
        """(node id, slots used, slots total, ready) of every node."""
        return [
            (n.record.node_id, len(n.experiments), n.record.slots,
             n.record.state == pb.NODE_STATE_READY)
            for n in list(self._nodes())
        ]


def forget(experiment_id: str) -> None:
    """Drop every series of ``experiment_id``."""
    for metric in _PER_EXPERIMENT:
        _remove(metric, experiment_id)
    for phase in PHASES:
        _remove(PHASE_SECONDS, experiment_id, phase)


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    # Series never observed (no evaluation ran): older prometheus_client raises.
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


_LIVE: weakref.WeakSet[SchedulerMetrics] = weakref.WeakSet()


class _SchedulerCollector(Collector):
    """Experiments by state and node slots, read from the live schedulers at
    scrape time (one per process in production; tests may run several)."""

    def collect(self) -> Iterator[Metric]:
        experiments = GaugeMetricFamily(
            "lorafleet_scheduler_experiments",
            "Experiments in an active state (QUEUED, RUNNING, PAUSED) now.",
            labels=["state"],
        )
        used = GaugeMetricFamily(
            "lorafleet_scheduler_node_slots_used",
            "Adapter slots of the node taken by running experiments.",
            labels=["node"],
        )
        total = GaugeMetricFamily(
            "lorafleet_scheduler_node_slots_total", "Adapter slots of the node.", labels=["node"]
        )
        ready = GaugeMetricFamily(
            "lorafleet_scheduler_node_ready", "1 when the node is READY, 0 when LOST.",
            labels=["node"],
        )
        counts: dict[str, int] = {}
        nodes: dict[str, tuple[int, int, bool]] = {}
        for scheduler in list(_LIVE):
            for state, n in scheduler.state_counts().items():
                counts[state] = counts.get(state, 0) + n
            for node_id, slots_used, slots_total, is_ready in scheduler.node_rows():
                nodes[node_id] = (slots_used, slots_total, is_ready)
        if _LIVE:
            for state, n in sorted(counts.items()):
                experiments.add_metric([state], n)
        for node_id, (slots_used, slots_total, is_ready) in sorted(nodes.items()):
            used.add_metric([node_id], slots_used)
            total.add_metric([node_id], slots_total)
            ready.add_metric([node_id], 1.0 if is_ready else 0.0)
        yield from (experiments, used, total, ready)


REGISTRY.register(_SchedulerCollector())
