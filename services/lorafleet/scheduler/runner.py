"""The RL control loop of one experiment on one node (DESIGN.md section 1).

Per step s: sample prompts -> Generate on the rollout engine with the current
adapter version -> score -> GRPO advantages -> TrainStep -> SaveState
(checkpoint) -> SaveVersion (publish by reference) -> store the step. Version
numbers follow steps: version 1 is the untrained adapter, step s publishes
version s + 1.

Every state-changing call carries a request_id derived from (experiment, step,
phase), so a step replayed after a scheduler restart replays the first answers
instead of training or publishing twice. On (re)start `prepare` reconciles the
three views of progress (scheduler store, registry, trainer) before the loop
runs: a version published by a step whose metrics were not stored is adopted,
and a trainer that is ahead of or behind the last completed step is restored
from the checkpoint.

Off-policy pipelining: generation for step s may use any version >= s -
max_staleness, so with max_staleness >= 1 the next batch is generated while the
current one trains. Every sample records the version that generated it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from lorafleet.api.common.v1 import adapter_pb2, metrics_pb2, sampling_pb2
from lorafleet.api.environment.v1 import environment_pb2 as env_pb
from lorafleet.api.registry.v1 import registry_pb2, registry_pb2_grpc
from lorafleet.api.rollout.v1 import rollout_pb2
from lorafleet.api.trainer.v1 import trainer_pb2
from lorafleet.client.registry import selector_text
from lorafleet.core.errors import Aborted, AlreadyExists
from lorafleet.scheduler.batching import (
    ROLLOUT_CHUNKS_PER_BUDGET,
    TRAIN_CHUNKS_PER_BUDGET,
    drop_zero_advantage,
    loss_tokens,
    merge_train_metrics,
    rollout_chunks,
    sample_tokens,
    scaled_chunk,
    train_chunks,
)
from lorafleet.scheduler.environments import Environment
from lorafleet.scheduler.grpo import group_advantages
from lorafleet.scheduler.nodes import NodeHandle, NodeRpc
from lorafleet.scheduler.spec import DEFAULT_LOGPROB_GAP_EVERY
from lorafleet.scheduler.store import SchedulerStore
from lorafleet.scheduler.types import Checkpoint, ExperimentRecord
from lorafleet.trainer.fencing import stamp

log = structlog.get_logger(__name__)

# Metrics published with each version so that a restarted scheduler can rebuild
# a step whose metrics it never stored (see `adopt_orphan_version`).
_METRIC_KEYS = ("reward_mean", "reward_std", "accuracy", "rollout_tokens", "min_policy_version")
EVAL_SEED_OFFSET = 7919


@dataclass
class RunnerSettings:
    rollout_timeout_s: float
    train_timeout_s: float
    checkpoint_every_steps: int
    # The leader lease's fencing token, sent with every call that changes the
    # trainer's adapter (0: not fenced; see lorafleet.trainer.fencing).
    fencing_token: int = 0


@dataclass
class Rollout:
    """One step's generated and scored batch."""

    step: int
    policy_version: int
    samples: list[trainer_pb2.TrainSample]
    rewards: list[float]
    correct: list[bool]
    rollout_ms: float
    reward_ms: float
    queue_wait_ms: float
    tokens: int
    zero_advantage: int
    """Samples left out of training: advantage 0, so no gradient (see
    lorafleet.scheduler.batching.drop_zero_advantage)."""


def sequence_mean_weights(samples: list[trainer_pb2.TrainSample]) -> None:
    """Rescale advantages so the trainer's token-mean loss weighs every sample
    equally (GRPO's sequence-mean of token-means).

    The trainer averages the loss over all completion tokens of a request, so a
    long completion counts as many samples. Wrong answers tend to be the long
    ones (they do not stop), so under a token mean the negative advantages
    outweigh the positive ones and the update mostly pushes probability away
    from sampled text, raising entropy instead of sharpening correct answers.
    Scaling sample i by mean_len / len_i makes the token mean equal the mean
    over samples of each sample's own token mean; a positive factor leaves the
    PPO clipping decisions unchanged.
    """
    lengths = [len(s.sequence.token_ids) - s.sequence.prompt_length for s in samples]
    if not lengths:
        return
    mean_len = sum(lengths) / len(lengths)
    for sample, length in zip(samples, lengths, strict=True):
        sample.advantage *= mean_len / max(length, 1)


class StopRun(Exception):
    """Raised inside the loop when the experiment should stop at a step boundary."""


# The registry's answers when another publish of the adapter got there first.
_RACED_REASONS = frozenset({"PUBLISH_IN_PROGRESS", "PARENT_VERSION_MISMATCH"})


class PublishRaced(Exception):
    """Another incarnation of this experiment (a leader stopping or deposed while
    its step was in flight) published, or is publishing, the adapter's next
    version. This runner's trainer state is then not the one behind the
    registry's versions: it has been dropped, and the experiment must start
    again from what is stored (`prepare` adopts the other publish if it landed)."""


class ExperimentRunner:
    def __init__(
        self,
        record: ExperimentRecord,
        node: NodeHandle,
        registry: NodeRpc,
        store: SchedulerStore,
        env: Environment,
        settings: RunnerSettings,
        on_step: Callable[[metrics_pb2.StepMetrics], None],
        should_stop: Callable[[], bool],
    ) -> None:
        self.record = record
        self.node = node
        self.registry = registry
        self.store = store
        self.env = env
        self.settings = settings
        self.on_step = on_step
        self.should_stop = should_stop
        self.exp = record.experiment_id
        self.spec = record.spec
        self.algo = record.spec.algorithm
        self._progress = asyncio.Condition()
        self.incarnation = uuid.uuid4().hex[:12]
        self.log = log.bind(experiment=self.exp, node=node.node_id)

    # -- helpers -------------------------------------------------------------------

    def _rid(self, phase: str, step: int | None = None) -> str:
        """Request ids are unique per incarnation of the runner: within one, a
        retried call replays; a new incarnation (after a restart or a move) has
        first restored the trainer to the last completed step, so its calls are
        new work and must not replay answers of the lost incarnation."""
        suffix = "" if step is None else f":{step}"
        return f"{self.exp}:{self.incarnation}:{phase}{suffix}"

    async def _trainer(self, method: str, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        stub = getattr(self.node.trainer_stub, method)
        stamp(request, self.settings.fencing_token)
        return await self.node.trainer.call(
            stub, request, timeout_s or self.settings.train_timeout_s
        )

    async def _rollout(self, method: str, request):  # type: ignore[no-untyped-def]
        stub = getattr(self.node.rollout_stub, method)
        return await self.node.rollout.call(stub, request, self.settings.rollout_timeout_s)

    async def _registry(self, method: str, request):  # type: ignore[no-untyped-def]
        stub = self.registry.stub_for(registry_pb2_grpc.AdapterRegistryServiceStub)
        return await self.registry.call(getattr(stub, method), request)

    def _optimizer(self) -> trainer_pb2.OptimizerConfig:
        return trainer_pb2.OptimizerConfig(
            learning_rate=self.algo.learning_rate,
            weight_decay=self.algo.weight_decay,
            max_grad_norm=self.algo.max_grad_norm,
        )

    # -- start and resume --------------------------------------------------------------

    async def prepare(self) -> None:
        """Bring registry, trainer and store into agreement at the last completed step."""
        rec = self.record
        rec.adapter_id = rec.adapter_id or self.exp
        with contextlib.suppress(AlreadyExists):
            await self._registry(
                "CreateAdapter",
                registry_pb2.CreateAdapterRequest(
                    request_id=f"{self.exp}:registry-adapter",
                    adapter_id=rec.adapter_id,
                    experiment_id=self.exp,
                    base_model=self.spec.base_model,
                    lora=self.spec.lora,
                    labels=self._lineage(),
                ),
            )
        registered = (
            await self._registry(
                "GetAdapter", registry_pb2.GetAdapterRequest(adapter_id=rec.adapter_id)
            )
        ).adapter
        if registered.latest_version > rec.latest_version:
            await self._adopt_orphan_version(registered.latest_version)
        await self._restore_trainer()
        if rec.latest_version == 0:
            ref = await self._save_version(step=0, metrics={})
            rec.latest_version = ref.version
            await self.store.update_experiment(self.exp, latest_version=ref.version)
        if rec.base_accuracy is None:
            rec.base_accuracy = await self.evaluate(rec.latest_version)
            rec.latest_accuracy = rec.latest_accuracy or rec.base_accuracy
            await self.store.update_experiment(
                self.exp, base_accuracy=rec.base_accuracy, latest_accuracy=rec.latest_accuracy
            )
        self.log.info(
            "experiment_prepared",
            step=rec.current_step,
            version=rec.latest_version,
            base_accuracy=rec.base_accuracy,
        )

    def _lineage(self) -> dict[str, str]:
        # The registry alone then tells where an adapter's weights started.
        if not self.spec.HasField("init_from"):
            return {}
        return {"init_from": selector_text(self.spec.init_from)}

    async def _adopt_orphan_version(self, registry_latest: int) -> None:
        """A step published its version but the scheduler died before storing the
        step: rebuild the step from the version's metrics instead of re-running it."""
        rec = self.record
        version = (
            await self._registry(
                "GetVersion",
                registry_pb2.GetVersionRequest(adapter_id=rec.adapter_id, version=registry_latest),
            )
        ).version
        expected_step = rec.current_step + 1
        if registry_latest != rec.latest_version + 1 or version.training_step != expected_step:
            raise RuntimeError(
                f"registry has version {registry_latest} (step {version.training_step}) but the"
                f" scheduler is at version {rec.latest_version} (step {rec.current_step})"
            )
        m = version.metrics
        metrics = metrics_pb2.StepMetrics(
            step=expected_step,
            adapter_version=registry_latest,
            min_policy_version=int(m.get("min_policy_version", registry_latest - 1)),
            reward_mean=m.get("reward_mean", 0.0),
            reward_std=m.get("reward_std", 0.0),
            accuracy=m.get("accuracy", 0.0),
            rollout_tokens=int(m.get("rollout_tokens", 0)),
        )
        await self.store.complete_step(
            self.exp,
            metrics,
            latest_version=registry_latest,
            last_reward=metrics.reward_mean,
            last_accuracy=metrics.accuracy,
        )
        rec.current_step = expected_step
        rec.latest_version = registry_latest
        self.log.warning("orphan_version_adopted", step=expected_step, version=registry_latest)
        self.on_step(metrics)

    async def _trainer_adapter(self) -> trainer_pb2.AdapterInfo | None:
        status = await self._trainer("GetTrainerStatus", trainer_pb2.GetTrainerStatusRequest())
        for adapter in status.adapters:
            if adapter.adapter_id == self.record.adapter_id:
                return adapter
        return None

    async def _restore_trainer(self) -> None:
        rec = self.record
        info = await self._trainer_adapter()
        # A gradient left by a chunked step that never reached its OptimStep (the
        # scheduler died in between) would leak into the next step: reload.
        if info is not None and info.step == rec.current_step and not info.pending_gradient_bytes:
            return
        have = None if info is None else info.step
        if have is not None:
            await self._trainer(
                "DropAdapter",
                trainer_pb2.DropAdapterRequest(
                    request_id=self._rid("drop", rec.current_step),
                    adapter_id=rec.adapter_id,
                ),
            )
        if rec.checkpoint.uri and rec.checkpoint.step == rec.current_step:
            await self._trainer(
                "LoadState",
                trainer_pb2.LoadStateRequest(
                    request_id=self._rid("load-state", rec.current_step),
                    adapter_id=rec.adapter_id,
                    uri=rec.checkpoint.uri,
                    sha256=rec.checkpoint.sha256,
                ),
            )
            self.log.info("trainer_restored_from_checkpoint", step=rec.current_step)
            return
        request = trainer_pb2.CreateAdapterRequest(
            request_id=self._rid("create", rec.current_step),
            adapter_id=rec.adapter_id,
            lora=self.spec.lora,
            optimizer=self._optimizer(),
            seed=self.spec.seed,
        )
        if rec.latest_version > 0:
            # No checkpoint of this step: weights from the published version,
            # fresh optimizer moments.
            request.from_version.CopyFrom(
                adapter_pb2.AdapterSelector(adapter_id=rec.adapter_id, version=rec.latest_version)
            )
            self.log.warning("optimizer_state_reset", step=rec.current_step)
        elif self.spec.HasField("init_from"):
            # Step 0 of an experiment started from another version (pinned at submit).
            request.from_version.CopyFrom(self.spec.init_from)
        await self._trainer("CreateAdapter", request)

    # -- the loop ---------------------------------------------------------------------

    def _done(self) -> bool:
        return 0 < self.algo.max_steps <= self.record.current_step

    async def run(self) -> None:
        """Run steps until max_steps, or until `should_stop` at a step boundary."""
        results: asyncio.Queue[Rollout | BaseException] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(results))
        try:
            while not self._done():
                if self.should_stop():
                    await self._checkpoint_now()
                    raise StopRun()
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                await self._train_and_publish(item)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        await self._final_eval()

    async def _produce(self, results: asyncio.Queue[Rollout | BaseException]) -> None:
        step = self.record.current_step + 1
        try:
            while self.algo.max_steps == 0 or step <= self.algo.max_steps:
                # Version v is published by step v - 1; generation for `step` may
                # use any version >= step - max_staleness.
                needed = max(step - self.algo.max_staleness, 1)
                async with self._progress:
                    await self._progress.wait_for(lambda n=needed: self.record.latest_version >= n)
                await results.put(await self._generate_and_score(step))
                step += 1
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which fails the run
            await results.put(exc)

    async def _sample_prompts(self, step: int) -> list[env_pb.EnvPrompt]:
        pushed = await self.store.take_data(self.exp, "prompt", self.algo.prompts_per_step)
        prompts = [
            env_pb.EnvPrompt(prompt_id=f"pushed/{step}/{i}", text=p["text"])
            for i, p in enumerate(pushed)
        ]
        for prompt, item in zip(prompts, pushed, strict=True):
            prompt.metadata.update(item.get("metadata", {}))
        missing = self.algo.prompts_per_step - len(prompts)
        if missing > 0:
            prompts += await self.env.sample_prompts(missing, seed=self.spec.seed, step=step)
        return prompts

    def _wants_sampling_logprobs(self, step: int) -> bool:
        """Whether `step`'s rollout asks the engine for sampling logprobs.

        A run with max_staleness > 0 may train a batch off-policy, where the
        importance ratio corrects with them: always. A strictly on-policy run
        trains every batch on the very weights that sampled it (the ratio is
        then the trainer's own, see ``_train``), so it asks only on the steps
        that measure logprob_gap.
        """
        if self.algo.max_staleness > 0:
            return True
        # Specs stored before the field existed hold 0: the default then too.
        every = self.algo.logprob_gap_every or DEFAULT_LOGPROB_GAP_EVERY
        return step == 1 or step % every == 0

    async def _generate_and_score(self, step: int) -> Rollout:
        version = self.record.latest_version
        group = self.algo.group_size
        prompts = await self._sample_prompts(step)
        per_prompt_cost = group * (self.algo.max_tokens + 32)
        base_seed = (self.spec.seed * 1_000_003 + step) % (2**31)
        max_chunk_cost = self.node.rollout_gate.budget // ROLLOUT_CHUNKS_PER_BUDGET
        chunks = rollout_chunks(len(prompts), per_prompt_cost, max_chunk_cost)

        async def generate(index: int, lo: int, hi: int):  # type: ignore[no-untyped-def]
            request = rollout_pb2.GenerateRequest(
                adapter=adapter_pb2.AdapterSelector(
                    adapter_id=self.record.adapter_id, version=version
                ),
                prompts=[rollout_pb2.Prompt(text=p.text) for p in prompts[lo:hi]],
                n=group,
                sampling=sampling_pb2.SamplingParams(
                    temperature=self.algo.temperature,
                    max_tokens=self.algo.max_tokens,
                    stop=self.env.stop,
                    # Chunk 0 keeps the step's seed: a step that fits one chunk
                    # samples exactly as it did before chunking existed.
                    seed=(base_seed + index) % (2**31),
                    skip_logprobs=not self._wants_sampling_logprobs(step),
                ),
                experiment_id=self.exp,
            )
            cost = (hi - lo) * per_prompt_cost
            async with self.node.rollout_gate.admit(self.exp, cost, self.spec.weight) as waited:
                return await self._rollout("Generate", request), waited

        started = time.monotonic()
        answers = await asyncio.gather(
            *(generate(i, lo, hi) for i, (lo, hi) in enumerate(chunks))
        )
        waited_ms = sum(waited for _, waited in answers)
        rollout_ms = (time.monotonic() - started) * 1000 - min(w for _, w in answers)
        response = rollout_pb2.GenerateResponse(adapter_version=answers[0][0].adapter_version)
        for answer, _ in answers:
            response.results.extend(answer.results)
        started = time.monotonic()
        items = [
            (prompt, completion.text)
            for prompt, result in zip(prompts, response.results, strict=True)
            for completion in result.completions
        ]
        scores = await self.env.score(items)
        reward_ms = (time.monotonic() - started) * 1000
        if self.algo.exact_match_reward:
            rewards = [1.0 if s.correct else 0.0 for s in scores]
        else:
            rewards = [s.reward for s in scores]
        samples: list[trainer_pb2.TrainSample] = []
        tokens = 0
        for p_index, result in enumerate(response.results):
            group_rewards = rewards[p_index * group : (p_index + 1) * group]
            for completion, advantage in zip(
                result.completions, group_advantages(group_rewards), strict=True
            ):
                prompt_ids = list(result.prompt_token_ids)
                sample = trainer_pb2.TrainSample(
                    sampling_logprobs=completion.logprobs,
                    advantage=advantage,
                    policy_version=response.adapter_version or version,
                )
                sample.sequence.token_ids.extend(prompt_ids + list(completion.token_ids))
                sample.sequence.prompt_length = len(prompt_ids)
                samples.append(sample)
                tokens += len(completion.token_ids)
        sequence_mean_weights(samples)
        samples, zero_advantage = drop_zero_advantage(samples, kl_coef=self.algo.kl_coef)
        return Rollout(
            step=step,
            policy_version=response.adapter_version or version,
            samples=samples,
            rewards=rewards,
            correct=[s.correct for s in scores],
            rollout_ms=rollout_ms,
            reward_ms=reward_ms,
            queue_wait_ms=waited_ms,
            tokens=tokens,
            zero_advantage=zero_advantage,
        )

    async def _train_and_publish(self, batch: Rollout) -> None:
        rec = self.record
        step = batch.step
        step_started = time.monotonic()
        trained, train_ms, waited = await self._train(batch)
        started = time.monotonic()
        n = len(batch.rewards)
        reward_mean = sum(batch.rewards) / n
        reward_std = (sum((r - reward_mean) ** 2 for r in batch.rewards) / n) ** 0.5
        accuracy = sum(batch.correct) / n
        if step % self.settings.checkpoint_every_steps == 0 or self._is_last(step):
            saved = await self._trainer(
                "SaveState",
                trainer_pb2.SaveStateRequest(
                    request_id=self._rid("save-state", step), adapter_id=rec.adapter_id
                ),
            )
            rec.checkpoint = Checkpoint(saved.uri, saved.sha256, step)
        ref = await self._save_version(
            step=step,
            metrics={
                "reward_mean": reward_mean,
                "reward_std": reward_std,
                "accuracy": accuracy,
                "rollout_tokens": float(batch.tokens),
                "min_policy_version": float(batch.policy_version),
            },
        )
        publish_ms = (time.monotonic() - started) * 1000
        eval_accuracy = None
        if self.algo.eval_every and step % self.algo.eval_every == 0 and not self._is_last(step):
            eval_accuracy = await self.evaluate(ref.version)
        metrics = metrics_pb2.StepMetrics(
            step=step,
            adapter_version=ref.version,
            min_policy_version=batch.policy_version,
            reward_mean=reward_mean,
            reward_std=reward_std,
            accuracy=accuracy,
            train=trained,
            rollout_tokens=batch.tokens,
            zero_advantage_sequences=batch.zero_advantage,
            times=metrics_pb2.PhaseTimes(
                rollout_ms=batch.rollout_ms,
                reward_ms=batch.reward_ms,
                train_ms=train_ms,
                publish_ms=publish_ms,
                queue_wait_ms=batch.queue_wait_ms + waited,
                step_ms=batch.rollout_ms
                + batch.reward_ms
                + (time.monotonic() - step_started) * 1000,
            ),
        )
        if eval_accuracy is not None:
            metrics.eval_accuracy = eval_accuracy
        fields: dict[str, object] = {
            "latest_version": ref.version,
            "last_reward": reward_mean,
            "last_accuracy": accuracy,
            "last_step_ms": metrics.times.step_ms,
        }
        if eval_accuracy is not None:
            fields["latest_accuracy"] = eval_accuracy
            rec.latest_accuracy = eval_accuracy
        await self.store.complete_step(
            self.exp,
            metrics,
            checkpoint=rec.checkpoint if rec.checkpoint.step == step else None,
            **fields,
        )
        async with self._progress:
            rec.current_step = step
            rec.latest_version = ref.version
            rec.last_reward = reward_mean
            rec.last_accuracy = accuracy
            rec.last_step_ms = metrics.times.step_ms
            self._progress.notify_all()
        self.on_step(metrics)

    async def _train(self, batch: Rollout) -> tuple[metrics_pb2.TrainMetrics, float, float]:
        """Train on the step's batch: one TrainStep when it fits a train chunk,
        else scaled ForwardBackward chunks (each admitted through the node's train
        gate on its own, one at a time) and one OptimStep. Returns the metrics,
        the trainer time and the fair-share wait, in milliseconds."""
        rec = self.record
        gate = self.node.train_gate
        loss = trainer_pb2.LossConfig(
            kind=trainer_pb2.LOSS_KIND_POLICY_GRADIENT,
            clip_low=self.algo.clip_epsilon,
            clip_high=self.algo.clip_epsilon,
            kl_coef=self.algo.kl_coef,
            # The trainer holds the weights of the latest published version; a
            # batch generated by that version is on-policy, and its importance
            # ratio is then exactly 1 rather than 1 +- the rollout engine's
            # rounding, so the update depends only on what was sampled.
            on_policy=batch.policy_version == rec.latest_version,
        )
        chunks = train_chunks(batch.samples, gate.budget // TRAIN_CHUNKS_PER_BUDGET)
        if len(chunks) == 1:
            trained, train_ms, waited_ms = await self._admitted_train_call(
                "TrainStep",
                trainer_pb2.TrainStepRequest(
                    request_id=self._rid("train", batch.step),
                    adapter_id=rec.adapter_id,
                    samples=batch.samples,
                    loss=loss,
                    learning_rate=self.algo.learning_rate,
                    weight=self.spec.weight,
                ),
            )
            return trained.metrics, train_ms, waited_ms
        step_loss_tokens = sum(loss_tokens(s) for s in batch.samples)
        parts: list[metrics_pb2.TrainMetrics] = []
        train_ms = waited_ms = 0.0
        for index, chunk in enumerate(chunks):
            samples, chunk_loss = scaled_chunk(chunk, loss, step_loss_tokens)
            answer, ms, waited = await self._admitted_train_call(
                "ForwardBackward",
                trainer_pb2.ForwardBackwardRequest(
                    request_id=self._rid(f"forward-backward-{index}", batch.step),
                    adapter_id=rec.adapter_id,
                    samples=samples,
                    loss=chunk_loss,
                    weight=self.spec.weight,
                ),
            )
            train_ms += ms
            waited_ms += waited
            parts.append(answer.metrics)
        started = time.monotonic()
        stepped = await self._trainer(
            "OptimStep",
            trainer_pb2.OptimStepRequest(
                request_id=self._rid("optim", batch.step),
                adapter_id=rec.adapter_id,
                learning_rate=self.algo.learning_rate,
            ),
        )
        train_ms += (time.monotonic() - started) * 1000
        return merge_train_metrics(parts, stepped.grad_norm), train_ms, waited_ms

    async def _admitted_train_call(self, method: str, request):  # type: ignore[no-untyped-def]
        """A trainer call carrying samples, admitted through the node's train gate
        at their token count. Returns the answer, the trainer time and the
        fair-share wait, in milliseconds."""
        tokens = sum(sample_tokens(s) for s in request.samples)
        async with self.node.train_gate.admit(self.exp, tokens, self.spec.weight) as waited:
            started = time.monotonic()
            answer = await self._trainer(method, request)
            return answer, (time.monotonic() - started) * 1000, waited

    async def _checkpoint_now(self) -> None:
        """Save state at the last completed step (before giving the slot back)."""
        rec = self.record
        if rec.checkpoint.step == rec.current_step and rec.checkpoint.uri:
            return
        saved = await self._trainer(
            "SaveState",
            trainer_pb2.SaveStateRequest(
                request_id=self._rid("save-state", rec.current_step), adapter_id=rec.adapter_id
            ),
        )
        rec.checkpoint = Checkpoint(saved.uri, saved.sha256, rec.current_step)
        await self.store.save_checkpoint(self.exp, rec.checkpoint)

    def _is_last(self, step: int) -> bool:
        return 0 < self.algo.max_steps == step

    async def _save_version(
        self, *, step: int, metrics: dict[str, float]
    ) -> adapter_pb2.AdapterRef:
        request = trainer_pb2.SaveVersionRequest(
            request_id=self._rid("save-version", step),
            adapter_id=self.record.adapter_id,
            registry_adapter_id=self.record.adapter_id,
            expected_parent_version=self.record.latest_version,
            training_step=step,
            metrics=metrics,
        )
        try:
            response = await self._trainer("SaveVersion", request)
        except Aborted as exc:
            if exc.reason not in _RACED_REASONS:
                raise
            self.log.warning("publish_raced", step=step, reason=exc.reason)
            await self._trainer(
                "DropAdapter",
                trainer_pb2.DropAdapterRequest(
                    request_id=self._rid("drop-raced", step), adapter_id=self.record.adapter_id
                ),
            )
            raise PublishRaced(f"step {step}: {exc.reason}: {exc.message}") from exc
        return response.ref

    async def _final_eval(self) -> None:
        if not self._done():
            return
        rec = self.record
        rec.latest_accuracy = await self.evaluate(rec.latest_version)
        await self.store.update_experiment(self.exp, latest_accuracy=rec.latest_accuracy)

    async def evaluate(self, version: int) -> float:
        """Greedy exact-match accuracy of `version` on the held-out prompts."""
        prompts = await self.env.sample_prompts(
            self.algo.eval_prompts, seed=self.spec.seed + EVAL_SEED_OFFSET, step=0, eval=True
        )
        request = rollout_pb2.GenerateRequest(
            adapter=adapter_pb2.AdapterSelector(adapter_id=self.record.adapter_id, version=version),
            prompts=[rollout_pb2.Prompt(text=p.text) for p in prompts],
            n=1,
            sampling=sampling_pb2.SamplingParams(
                temperature=0.0,
                max_tokens=self.algo.max_tokens,
                stop=self.env.stop,
                skip_logprobs=True,
            ),
            experiment_id=self.exp,
        )
        cost = len(prompts) * (self.algo.max_tokens + 32)
        async with self.node.rollout_gate.admit(self.exp, cost, self.spec.weight):
            response = await self._rollout("Generate", request)
        scores = await self.env.score(
            [(p, r.completions[0].text) for p, r in zip(prompts, response.results, strict=True)]
        )
        return sum(s.correct for s in scores) / max(len(scores), 1)
