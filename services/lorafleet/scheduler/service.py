"""The scheduler's domain: experiments, nodes, placement and the runners.

One supervisor task places queued experiments on nodes and watches node
liveness; one runner task per running experiment drives its control loop
(`runner.py`). The store is the truth: on start the scheduler re-queues every
experiment that was running and each resumes at its last completed step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence

import structlog
from google.protobuf import timestamp_pb2

from lorafleet.api.common.v1 import metrics_pb2
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.api.trainer.v1 import trainer_pb2
from lorafleet.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LorafleetError,
    NotFound,
    Unavailable,
)
from lorafleet.core.validation import ID_PATTERN
from lorafleet.environment.structs import struct_to_dict
from lorafleet.scheduler.config import SchedulerSettings
from lorafleet.scheduler.environments import EnvironmentFailed, open_environment
from lorafleet.scheduler.events import EventHub
from lorafleet.scheduler.init_from import pin_init_from
from lorafleet.scheduler.metrics import SchedulerMetrics
from lorafleet.scheduler.nodes import NodeHandle, NodeRpc
from lorafleet.scheduler.placement import NodeCapacity, choose_node
from lorafleet.scheduler.runner import (
    ExperimentRunner,
    PublishRaced,
    RunnerSettings,
    StopRun,
)
from lorafleet.scheduler.spec import normalise_spec
from lorafleet.scheduler.store import SchedulerStore
from lorafleet.scheduler.types import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    ExperimentRecord,
    NodeRecord,
)
from lorafleet.trainer.fencing import StaleFencingToken

log = structlog.get_logger(__name__)

_ID = re.compile(ID_PATTERN)

SUPERVISOR_TICK_S = 0.25
MAX_PUSH_ITEMS = 10_000


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class Scheduler:
    def __init__(self, store: SchedulerStore, registry: NodeRpc, settings: SchedulerSettings):
        self.store = store
        self.registry = registry
        self.settings = settings
        self.hub = EventHub()
        self.nodes: dict[str, NodeHandle] = {}
        self.metrics = SchedulerMetrics(lambda: self.nodes.values())
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop_requests: dict[str, int] = {}
        self._queued_since: dict[str, float] = {}
        self._unreachable_since: dict[str, float] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Often enough that a healthy static node never looks silent for
        # node_timeout_s, however the two settings are set.
        self._probe_interval_s = min(settings.heartbeat_interval_s, settings.node_timeout_s / 4)
        self._runner_settings = RunnerSettings(
            rollout_timeout_s=settings.rollout_timeout_s,
            train_timeout_s=settings.train_timeout_s,
            checkpoint_every_steps=settings.checkpoint_every_steps,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the tables and lead: a scheduler that is the only replica."""
        await self.prepare()
        await self.lead()

    @property
    def fencing_token(self) -> int:
        return self._runner_settings.fencing_token

    async def prepare(self) -> None:
        """What every replica does first, leader or standby."""
        await self.store.create_tables()

    async def lead(self, fencing_token: int = 0) -> None:
        """Take over the cluster as the replica that drives it: the nodes, and
        every experiment the database says was running or queued.

        `fencing_token` (the leader lease's) goes with every call that changes
        an adapter on a trainer, so that the trainer refuses a deposed leader's
        calls once this one's have arrived (0: a lone scheduler, not fenced)."""
        self._runner_settings = dataclasses.replace(
            self._runner_settings, fencing_token=fencing_token
        )
        now = time.time()
        for static in self.settings.nodes:
            await self.store.upsert_node(
                NodeRecord(
                    node_id=static.node_id,
                    rollout_address=static.rollout_address,
                    trainer_address=static.trainer_address,
                    base_model=static.base_model,
                    slots=static.slots,
                    max_rank=static.max_rank,
                    last_heartbeat=now,
                    static=True,
                )
            )
        for record in await self.store.list_nodes():
            self._connect(record)
        await self._count_active_experiments()
        for rec in await self.store.list_experiments(
            [pb.EXPERIMENT_STATE_RUNNING, pb.EXPERIMENT_STATE_QUEUED]
        ):
            # Whatever was running resumes at its last completed step.
            if rec.state == pb.EXPERIMENT_STATE_RUNNING:
                await self._set_state(rec, pb.EXPERIMENT_STATE_QUEUED, "scheduler restarted")
            self._queued_since[rec.experiment_id] = time.monotonic()
        self._supervisor = asyncio.create_task(self._supervise(), name="scheduler-supervisor")
        log.info("scheduler_started", nodes=len(self.nodes))

    async def _count_active_experiments(self) -> None:
        """Seed the experiments-by-state metric from the store (state changes
        after this are counted as they happen)."""
        after = ""
        while batch := await self.store.list_experiments(ACTIVE_STATES, after_id=after):
            for rec in batch:
                self.metrics.experiment_state(rec.experiment_id, rec.state)
            after = batch[-1].experiment_id

    async def close(self) -> None:
        self.metrics.close()
        if self._supervisor:
            self._supervisor.cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(
            *tasks, *([self._supervisor] if self._supervisor else []), return_exceptions=True
        )
        for node in self.nodes.values():
            await node.close()
        await self.registry.close()

    def _connect(self, record: NodeRecord) -> NodeHandle:
        existing = self.nodes.get(record.node_id)
        if existing is not None:
            existing.record = record
            return existing
        handle = NodeHandle.connect(
            record, budget_tokens=self.settings.max_inflight_tokens_per_node
        )
        self.nodes[record.node_id] = handle
        return handle

    # -- experiments ------------------------------------------------------------------------

    async def validate(self, spec: pb.ExperimentSpec, experiment_id: str = "") -> ExperimentRecord:
        """The record `submit` would store, or the error it would raise; stores nothing."""
        if experiment_id and not _ID.fullmatch(experiment_id):
            raise InvalidArgument(
                f"experiment_id {experiment_id!r} must match {ID_PATTERN}",
                reason="INVALID_EXPERIMENT_ID",
            )
        spec = await pin_init_from(spec, self.registry)
        normalised = normalise_spec(spec, [n.record for n in self.nodes.values()])
        if experiment_id:
            with contextlib.suppress(NotFound):
                await self.store.get_experiment(experiment_id)
                raise AlreadyExists(
                    f"experiment {experiment_id!r} already exists", reason="EXPERIMENT_EXISTS"
                )
        return ExperimentRecord(
            experiment_id=experiment_id,
            spec=normalised,
            state=pb.EXPERIMENT_STATE_UNSPECIFIED,
            adapter_id=experiment_id,
            create_time=time.time(),
        )

    async def submit(self, spec: pb.ExperimentSpec, experiment_id: str = "") -> ExperimentRecord:
        record = await self.validate(spec, experiment_id)
        experiment_id = experiment_id or f"exp-{uuid.uuid4().hex[:10]}"
        record.experiment_id = record.adapter_id = experiment_id
        record.state = pb.EXPERIMENT_STATE_QUEUED
        # validate looked for a taken id already; the insert refuses one atomically.
        await self.store.insert_experiment(record)
        self._queued_since[experiment_id] = time.monotonic()
        await self._event(record, pb.EXPERIMENT_STATE_QUEUED, "submitted")
        log.info("experiment_submitted", experiment=experiment_id, task=_task_name(record.spec))
        self._wake.set()
        return record

    async def get(self, experiment_id: str) -> ExperimentRecord:
        return await self.store.get_experiment(experiment_id)

    async def list(
        self,
        states: Sequence[int],
        *,
        after_id: str,
        limit: int,
        labels: Mapping[str, str] | None = None,
    ) -> list[ExperimentRecord]:
        return await self.store.list_experiments(
            states, after_id=after_id, limit=limit, labels=labels
        )

    async def pause(self, experiment_id: str) -> ExperimentRecord:
        rec = await self.store.get_experiment(experiment_id)
        if rec.state == pb.EXPERIMENT_STATE_PAUSED:
            return rec
        self._require_active(rec, "pause")
        if experiment_id in self._tasks:
            # The runner stops at the next step boundary and records PAUSED.
            self._stop_requests[experiment_id] = pb.EXPERIMENT_STATE_PAUSED
            await self._tasks[experiment_id]
        else:
            self._queued_since.pop(experiment_id, None)
            await self._set_state(rec, pb.EXPERIMENT_STATE_PAUSED, "paused by user")
        return await self.store.get_experiment(experiment_id)

    async def resume(self, experiment_id: str) -> ExperimentRecord:
        rec = await self.store.get_experiment(experiment_id)
        if rec.state in (pb.EXPERIMENT_STATE_RUNNING, pb.EXPERIMENT_STATE_QUEUED):
            return rec
        if rec.state != pb.EXPERIMENT_STATE_PAUSED:
            raise FailedPrecondition(
                f"experiment {experiment_id} is {pb.ExperimentState.Name(rec.state)};"
                " only PAUSED experiments resume",
                reason="NOT_PAUSED",
            )
        await self._set_state(rec, pb.EXPERIMENT_STATE_QUEUED, "resumed by user")
        self._queued_since[experiment_id] = time.monotonic()
        self._wake.set()
        return await self.store.get_experiment(experiment_id)

    async def cancel(self, experiment_id: str) -> ExperimentRecord:
        rec = await self.store.get_experiment(experiment_id)
        if rec.state == pb.EXPERIMENT_STATE_CANCELLED:
            return rec
        self._require_active(rec, "cancel")
        task = self._tasks.get(experiment_id)
        self._stop_requests[experiment_id] = pb.EXPERIMENT_STATE_CANCELLED
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        rec = await self.store.get_experiment(experiment_id)
        self._queued_since.pop(experiment_id, None)
        await self._set_state(
            rec, pb.EXPERIMENT_STATE_CANCELLED, "cancelled by user", end_time=time.time()
        )
        self._stop_requests.pop(experiment_id, None)
        node = self.nodes.get(rec.node_id)
        if node is not None:
            await self._release_adapter(rec, node)
        return await self.store.get_experiment(experiment_id)

    def _require_active(self, rec: ExperimentRecord, action: str) -> None:
        if rec.state in TERMINAL_STATES:
            raise FailedPrecondition(
                f"cannot {action} experiment {rec.experiment_id}: it is"
                f" {pb.ExperimentState.Name(rec.state)}",
                reason="EXPERIMENT_FINISHED",
            )

    async def push_data(
        self,
        experiment_id: str,
        prompts: Sequence[pb.DataPrompt],
        scored: Sequence[pb.ScoredExample],
    ) -> int:
        rec = await self.store.get_experiment(experiment_id)
        self._require_active(rec, "push data to")
        if len(prompts) + len(scored) > MAX_PUSH_ITEMS:
            raise InvalidArgument(
                f"at most {MAX_PUSH_ITEMS} items per PushData", reason="TOO_MANY_ITEMS"
            )
        if scored:
            raise FailedPrecondition(
                "scored examples are not consumed by the GRPO loop yet; push prompts",
                reason="SCORED_EXAMPLES_UNSUPPORTED",
            )
        items = []
        for index, prompt in enumerate(prompts):
            if not prompt.text:
                raise InvalidArgument(f"prompts[{index}].text is empty", reason="EMPTY_PROMPT")
            items.append(
                ("prompt", {"text": prompt.text, "metadata": struct_to_dict(prompt.metadata)})
            )
        return await self.store.push_data(experiment_id, items)

    async def watch(
        self, experiment_id: str, from_step: int
    ) -> AsyncIterator[pb.WatchExperimentResponse]:
        rec = await self.store.get_experiment(experiment_id)
        queue = self.hub.subscribe(experiment_id)
        try:
            for event in await self.store.list_events(experiment_id):
                yield pb.WatchExperimentResponse(lifecycle=event)
            last = from_step
            for metrics in await self.store.list_steps(experiment_id, after_step=from_step):
                last = metrics.step
                yield pb.WatchExperimentResponse(step=metrics)
            rec = await self.store.get_experiment(experiment_id)
            if rec.state in TERMINAL_STATES:
                return
            while True:
                event = await queue.get()
                kind = event.WhichOneof("event")
                if kind == "step":
                    if event.step.step <= last:
                        continue
                    last = event.step.step
                yield event
                if kind == "lifecycle" and event.lifecycle.state in TERMINAL_STATES:
                    return
        finally:
            self.hub.unsubscribe(experiment_id, queue)

    # -- nodes -----------------------------------------------------------------------------

    async def register_node(self, node: pb.Node) -> NodeRecord:
        for field in ("node_id", "rollout_address", "trainer_address", "base_model"):
            if not getattr(node, field):
                raise InvalidArgument(f"node.{field} is required", reason="INVALID_NODE")
        if not _ID.fullmatch(node.node_id):
            raise InvalidArgument(
                f"node_id {node.node_id!r} must match {ID_PATTERN}",
                reason="INVALID_NODE",
            )
        if node.slots_total < 1 or node.max_rank < 1:
            raise InvalidArgument("slots_total and max_rank must be >= 1", reason="INVALID_NODE")
        record = NodeRecord(
            node_id=node.node_id,
            rollout_address=node.rollout_address,
            trainer_address=node.trainer_address,
            base_model=node.base_model,
            slots=node.slots_total,
            max_rank=node.max_rank,
            last_heartbeat=time.time(),
        )
        await self.store.upsert_node(record)
        self._connect(record)
        self._wake.set()
        log.info("node_registered", node=node.node_id)
        return record

    async def heartbeat(self, node_id: str) -> int:
        handle = self.nodes.get(node_id)
        if handle is None:
            raise NotFound(f"node {node_id!r} is not registered", reason="NODE_NOT_FOUND")
        handle.record.last_heartbeat = time.time()
        if handle.record.state == pb.NODE_STATE_LOST:
            handle.record.state = pb.NODE_STATE_READY
            self._wake.set()
        await self.store.update_node(
            node_id, last_heartbeat=handle.record.last_heartbeat, state=handle.record.state
        )
        return handle.record.state

    def list_nodes(self) -> list[NodeHandle]:
        return sorted(self.nodes.values(), key=lambda n: n.node_id)

    # -- supervision ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                await self._check_nodes()
                # Every path that queues an experiment records it in _queued_since
                # and wakes this loop, so with nothing waiting there is nothing to
                # read (the store was read four times a second on an idle cluster).
                if self._queued_since:
                    await self._place_queued()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("supervisor_tick_failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SUPERVISOR_TICK_S)

    async def _check_nodes(self) -> None:
        now = time.time()
        for handle in list(self.nodes.values()):
            record = handle.record
            # Static nodes have no heartbeat sender (and a lost node may come
            # back): a health probe stands in for the heartbeat, at the heartbeat's
            # pace rather than at every tick (two Check calls each, which at four
            # a second took a busy node's CPU for nothing), and once more before
            # a ready node is declared lost.
            silent = now - record.last_heartbeat > self.settings.node_timeout_s
            probe = (record.static or record.state == pb.NODE_STATE_LOST) and (
                now - handle.probed_at >= self._probe_interval_s
                or (record.state == pb.NODE_STATE_READY and silent)
            )
            if probe:
                handle.probed_at = now
            if probe and await handle.alive():
                record.last_heartbeat = now
                if record.state == pb.NODE_STATE_LOST:
                    record.state = pb.NODE_STATE_READY
                    await self.store.update_node(record.node_id, state=record.state)
                    log.info("node_recovered", node=record.node_id)
            if (
                record.state == pb.NODE_STATE_READY
                and now - record.last_heartbeat > self.settings.node_timeout_s
            ):
                await self._node_lost(handle)

    async def _node_lost(self, handle: NodeHandle) -> None:
        handle.record.state = pb.NODE_STATE_LOST
        await self.store.update_node(handle.node_id, state=pb.NODE_STATE_LOST)
        moved = sorted(handle.experiments)
        log.warning("node_lost", node=handle.node_id, experiments=moved)
        for experiment_id in moved:
            self._stop_requests[experiment_id] = pb.EXPERIMENT_STATE_QUEUED
            task = self._tasks.get(experiment_id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            rec = await self.store.get_experiment(experiment_id)
            await self._set_state(
                rec, pb.EXPERIMENT_STATE_QUEUED, f"node {handle.node_id} lost; moving", node_id=""
            )
            self._queued_since[experiment_id] = time.monotonic()
            self._stop_requests.pop(experiment_id, None)
        handle.experiments.clear()

    async def _place_queued(self) -> None:
        queued = await self.store.list_experiments([pb.EXPERIMENT_STATE_QUEUED])
        queued.sort(key=lambda r: r.create_time)
        for rec in queued:
            if rec.experiment_id in self._tasks:
                continue
            capacities = [
                NodeCapacity(
                    node_id=n.node_id,
                    base_model=n.record.base_model,
                    max_rank=n.record.max_rank,
                    free_slots=n.free_slots,
                    ready=n.record.state == pb.NODE_STATE_READY,
                )
                for n in self.nodes.values()
            ]
            node_id = choose_node(rec.spec, capacities)
            if node_id is None:
                continue
            self._start_runner(rec, self.nodes[node_id])

    def _start_runner(self, rec: ExperimentRecord, node: NodeHandle) -> None:
        node.experiments.add(rec.experiment_id)
        task = asyncio.create_task(self._run(rec, node), name=f"experiment-{rec.experiment_id}")
        self._tasks[rec.experiment_id] = task

    async def _run(self, rec: ExperimentRecord, node: NodeHandle) -> None:
        experiment_id = rec.experiment_id
        waited = time.monotonic() - self._queued_since.pop(experiment_id, time.monotonic())
        rec.queue_wait_ms += waited * 1000
        self.metrics.placed(waited)
        if rec.start_time is None:
            rec.start_time = time.time()
        await self.store.update_experiment(
            experiment_id,
            node_id=node.node_id,
            queue_wait_ms=rec.queue_wait_ms,
            start_time=rec.start_time,
        )
        env = None
        outcome: tuple[int, str] | None = None
        try:
            env = await open_environment(rec.spec.environment, experiment_id)
            runner = ExperimentRunner(
                rec,
                node,
                self.registry,
                self.store,
                env,
                self._runner_settings,
                on_step=lambda m: self._on_step(experiment_id, m),
                should_stop=lambda: experiment_id in self._stop_requests,
            )
            await self._set_state(
                rec,
                pb.EXPERIMENT_STATE_RUNNING,
                f"running on {node.node_id}",
                node_id=node.node_id,
            )
            await runner.prepare()
            await runner.run()
            outcome = (pb.EXPERIMENT_STATE_COMPLETED, f"finished {rec.current_step} steps")
        except StopRun:
            requested = self._stop_requests.get(experiment_id, pb.EXPERIMENT_STATE_PAUSED)
            outcome = (requested, "paused by user")
        except asyncio.CancelledError:
            outcome = None  # cancel() / node loss record the state themselves
            raise
        except PublishRaced as exc:
            # Start again from what is stored; the other publish, if it landed,
            # is adopted as the step it was.
            outcome = (pb.EXPERIMENT_STATE_QUEUED, f"resuming after a concurrent publish ({exc})")
        except EnvironmentFailed as exc:
            log.warning("environment_failed", experiment=experiment_id, reason=exc.reason)
            outcome = (pb.EXPERIMENT_STATE_PAUSED, f"{exc.reason}: {exc.message}")
        except (Unavailable, DeadlineExceeded) as exc:
            # The node may be going away; retry from the last completed step
            # (on this node or, once it is marked lost, another one).
            log.warning("node_call_failed", experiment=experiment_id, reason=exc.reason)
            reason = f"node {node.node_id} call failed ({exc.reason}); retrying"
            if not await node.alive():
                # Let the supervisor's next tick declare the node lost instead of
                # placing the experiment right back onto it.
                node.record.last_heartbeat = 0.0
                reason = f"node {node.node_id} lost ({exc.reason}); moving to another node"
            outcome = (pb.EXPERIMENT_STATE_QUEUED, reason)
        except LorafleetError as exc:
            if exc.reason == StaleFencingToken.reason:
                # A newer leader owns the adapter: this replica was deposed and
                # its lease loop is about to stop it; the experiment is not ours
                # to mark (and the database's fence would refuse the write).
                log.warning("experiment_owned_by_newer_leader", experiment=experiment_id)
                outcome = None
            else:
                log.error("experiment_failed", experiment=experiment_id, reason=exc.reason)
                outcome = (pb.EXPERIMENT_STATE_FAILED, f"{exc.reason}: {exc.message}")
        except Exception as exc:
            log.exception("experiment_failed", experiment=experiment_id)
            outcome = (pb.EXPERIMENT_STATE_FAILED, f"INTERNAL: {exc}")
        finally:
            node.experiments.discard(experiment_id)
            self._tasks.pop(experiment_id, None)
            if env is not None:
                await env.close()
            if outcome is not None:
                state, reason = outcome
                await self._finish(rec, node, state, reason)

    async def _finish(
        self, rec: ExperimentRecord, node: NodeHandle, state: int, reason: str
    ) -> None:
        stored = await self.store.get_experiment(rec.experiment_id)
        fields: dict[str, object] = {}
        if state in TERMINAL_STATES:
            fields["end_time"] = time.time()
        if state == pb.EXPERIMENT_STATE_QUEUED:
            self._queued_since[rec.experiment_id] = time.monotonic()
            await asyncio.sleep(0.5)  # do not spin on a failing node
        await self._set_state(stored, state, reason, **fields)
        self._stop_requests.pop(rec.experiment_id, None)
        if state in TERMINAL_STATES or state == pb.EXPERIMENT_STATE_PAUSED:
            # A paused experiment gives its slot back; resume restores it from
            # the checkpoint, on whichever node has room.
            await self._release_adapter(stored, node)
        self._wake.set()

    async def _release_adapter(self, rec: ExperimentRecord, node: NodeHandle) -> None:
        try:
            await node.trainer.call(
                node.trainer_stub.DropAdapter,
                trainer_pb2.DropAdapterRequest(
                    # New per release: an experiment paused (released), resumed
                    # and then finished is released twice, and the second must
                    # drop the adapter, not replay the first's answer.
                    request_id=f"{rec.experiment_id}:release:{uuid.uuid4().hex[:12]}",
                    adapter_id=rec.adapter_id,
                    fencing_token=self.fencing_token,
                ),
                10.0,
            )
        except LorafleetError as exc:
            log.info("adapter_release_skipped", experiment=rec.experiment_id, reason=exc.reason)

    def _on_step(self, experiment_id: str, metrics: metrics_pb2.StepMetrics) -> None:
        self.hub.publish(experiment_id, pb.WatchExperimentResponse(step=metrics))
        self.metrics.step(experiment_id, metrics)

    async def _set_state(
        self, rec: ExperimentRecord, state: int, reason: str, **fields: object
    ) -> None:
        rec.state = state
        rec.state_reason = reason
        await self.store.update_experiment(
            rec.experiment_id, state=state, state_reason=reason, **fields
        )
        if "node_id" in fields:
            rec.node_id = str(fields["node_id"])
        await self._event(rec, state, reason)

    async def _event(self, rec: ExperimentRecord, state: int, reason: str) -> None:
        event = pb.LifecycleEvent(
            state=state, reason=reason, node_id=rec.node_id, time=_timestamp(time.time())
        )
        await self.store.add_event(rec.experiment_id, event)
        self.hub.publish(rec.experiment_id, pb.WatchExperimentResponse(lifecycle=event))
        self.metrics.experiment_state(rec.experiment_id, state)
        log.info(
            "experiment_state_changed",
            experiment=rec.experiment_id,
            state=pb.ExperimentState.Name(state),
            reason=reason,
        )


def _task_name(spec: pb.ExperimentSpec) -> str:
    env = spec.environment
    return env.builtin.task if env.WhichOneof("kind") == "builtin" else env.remote.address


def to_proto(rec: ExperimentRecord) -> pb.Experiment:
    out = pb.Experiment(
        name=f"experiments/{rec.experiment_id}",
        experiment_id=rec.experiment_id,
        spec=rec.spec,
        state=rec.state,
        state_reason=rec.state_reason,
        node_id=rec.node_id,
        current_step=rec.current_step,
        adapter_id=rec.adapter_id,
        latest_version=rec.latest_version,
        last_step=pb.StepSummary(
            step=rec.current_step,
            reward_mean=rec.last_reward,
            accuracy=rec.last_accuracy,
            step_ms=rec.last_step_ms,
        ),
        create_time=_timestamp(rec.create_time),
        queue_wait_ms=rec.queue_wait_ms,
    )
    if rec.base_accuracy is not None:
        out.base_accuracy = rec.base_accuracy
    if rec.latest_accuracy is not None:
        out.latest_accuracy = rec.latest_accuracy
    if rec.start_time is not None:
        out.start_time.CopyFrom(_timestamp(rec.start_time))
    if rec.end_time is not None:
        out.end_time.CopyFrom(_timestamp(rec.end_time))
    return out


def node_to_proto(handle: NodeHandle) -> pb.Node:
    record = handle.record
    return pb.Node(
        name=f"nodes/{record.node_id}",
        node_id=record.node_id,
        rollout_address=record.rollout_address,
        trainer_address=record.trainer_address,
        base_model=record.base_model,
        slots_total=record.slots,
        slots_used=len(handle.experiments),
        max_rank=record.max_rank,
        state=record.state,
        last_heartbeat_time=_timestamp(record.last_heartbeat),
    )
