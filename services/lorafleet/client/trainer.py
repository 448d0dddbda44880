"""Typed client of the TrainerService (Tinker-like training primitives).

    from lorafleet.client.trainer import TrainerClient, sample
    with TrainerClient("127.0.0.1:50071") as trainer:
        trainer.create_adapter("exp-1", lora={"rank": 8, "alpha": 16},
                               optimizer={"learning_rate": 3e-3})
        out = trainer.train_step("exp-1", [
            sample([1, 5, 6, 7], prompt_length=3, logprobs=[-0.7], advantage=1.0),
        ])
        out.step, out.metrics.loss
        trainer.compute_logprobs([([1, 5, 6, 7], 3)], adapter_id="exp-1")
        ref = trainer.save_version("exp-1", expected_parent_version=0)   # -> AdapterRef
        state = trainer.save_state("exp-1")                              # uri + sha256
        trainer.load_state("exp-1", state.uri, state.sha256)

Sequences are ``(token_ids, prompt_length)`` pairs or ``TokenSequence`` messages;
train samples are ``TrainSample`` messages (build them with :func:`sample`).
Responses are the proto messages (``protos/lorafleet/trainer/v1/trainer.proto``).
State-changing calls take an optional ``request_id`` (a fresh UUID when omitted);
pass the same one again to retry safely: the trainer replays its first answer
and never trains twice.

A controller that runs as replicas, one leading at a time, sets
``fencing_token`` (``TrainerClient(address, fencing_token=lease_token)``; on
``AsyncTrainerClient`` also an attribute): every state-changing call carries
it, and the trainer refuses, ``STALE_FENCING_TOKEN``, calls with a lower token
than it has seen for the adapter (``lorafleet.trainer.fencing``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from lorafleet.api.common.v1 import adapter_pb2, sampling_pb2
from lorafleet.api.trainer.v1 import trainer_pb2 as pb
from lorafleet.api.trainer.v1 import trainer_pb2_grpc
from lorafleet.client._base import AsyncServiceClient, SyncBridge
from lorafleet.client.registry import parse_selector
from lorafleet.trainer.fencing import stamp

# Training is a data-plane call: a fused pass over a big batch on a busy node,
# behind other adapters' passes, takes far longer than a control-plane call.
DEFAULT_TRAIN_TIMEOUT_S = 300.0

SequenceLike = sampling_pb2.TokenSequence | tuple[Sequence[int], int]
LOSS_KINDS = {
    "policy_gradient": pb.LOSS_KIND_POLICY_GRADIENT,
    "grpo": pb.LOSS_KIND_POLICY_GRADIENT,
    "cross_entropy": pb.LOSS_KIND_CROSS_ENTROPY,
    "sft": pb.LOSS_KIND_CROSS_ENTROPY,
}


def _rid(request_id: str | None) -> str:
    return request_id or str(uuid.uuid4())


def token_sequence(seq: SequenceLike) -> sampling_pb2.TokenSequence:
    if isinstance(seq, sampling_pb2.TokenSequence):
        return seq
    ids, prompt_length = seq
    return sampling_pb2.TokenSequence(token_ids=list(ids), prompt_length=prompt_length)


def sample(
    token_ids: Sequence[int],
    *,
    prompt_length: int,
    logprobs: Sequence[float] = (),
    advantage: float = 0.0,
    policy_version: int = 0,
) -> pb.TrainSample:
    """One ``TrainSample``: prompt + completion tokens, the rollout's logprob of each
    completion token, and the sequence's advantage."""
    return pb.TrainSample(
        sequence=sampling_pb2.TokenSequence(token_ids=list(token_ids), prompt_length=prompt_length),
        sampling_logprobs=list(logprobs),
        advantage=advantage,
        policy_version=policy_version,
    )


def loss_config(
    loss: pb.LossConfig | str | None = None,
    *,
    clip_low: float = 0.0,
    clip_high: float = 0.0,
    kl_coef: float = 0.0,
) -> pb.LossConfig:
    """``"policy_gradient"`` (alias ``"grpo"``, the default) or ``"cross_entropy"``
    (alias ``"sft"``); clip 0 means the server's 0.2."""
    if isinstance(loss, pb.LossConfig):
        return loss
    kind = LOSS_KINDS[loss] if loss is not None else pb.LOSS_KIND_POLICY_GRADIENT
    return pb.LossConfig(kind=kind, clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef)


def _lora(spec: adapter_pb2.LoraSpec | Mapping[str, Any]) -> adapter_pb2.LoraSpec:
    return spec if isinstance(spec, adapter_pb2.LoraSpec) else adapter_pb2.LoraSpec(**dict(spec))


def _optimizer(cfg: pb.OptimizerConfig | Mapping[str, float]) -> pb.OptimizerConfig:
    return cfg if isinstance(cfg, pb.OptimizerConfig) else pb.OptimizerConfig(**dict(cfg))


class AsyncTrainerClient(AsyncServiceClient):
    STUB = trainer_pb2_grpc.TrainerServiceStub

    def __init__(self, target: Any, *, fencing_token: int = 0, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.fencing_token = fencing_token

    async def _unary(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        stamp(request, self.fencing_token)
        return await super()._unary(method, request, timeout_s)

    # adapters

    async def create_adapter(
        self,
        adapter_id: str,
        *,
        lora: adapter_pb2.LoraSpec | Mapping[str, Any] | None = None,
        optimizer: pb.OptimizerConfig | Mapping[str, float] | None = None,
        seed: int = 0,
        from_version: str | adapter_pb2.AdapterSelector | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.AdapterInfo:
        """A fresh adapter from ``lora`` (e.g. ``{"rank": 8, "alpha": 16}``), or the
        weights of a registry version (``from_version="exp@3"``, fresh optimizer)."""
        request = pb.CreateAdapterRequest(
            request_id=_rid(request_id), adapter_id=adapter_id, seed=seed
        )
        if lora is not None:
            request.lora.CopyFrom(_lora(lora))
        if optimizer is not None:
            request.optimizer.CopyFrom(_optimizer(optimizer))
        if from_version is not None:
            selector = (
                parse_selector(from_version) if isinstance(from_version, str) else from_version
            )
            request.from_version.CopyFrom(selector)
        return (await self._unary(self.stub.CreateAdapter, request, timeout_s)).adapter

    async def drop_adapter(self, adapter_id: str, *, request_id: str | None = None) -> None:
        await self._unary(
            self.stub.DropAdapter,
            pb.DropAdapterRequest(request_id=_rid(request_id), adapter_id=adapter_id),
        )

    async def status(self) -> pb.GetTrainerStatusResponse:
        return await self._unary(self.stub.GetTrainerStatus, pb.GetTrainerStatusRequest())

    async def adapter_info(self, adapter_id: str) -> pb.AdapterInfo | None:
        """The adapter's entry in the trainer status (None when not loaded)."""
        for adapter in (await self.status()).adapters:
            if adapter.adapter_id == adapter_id:
                return adapter
        return None

    # training

    async def forward_backward(
        self,
        adapter_id: str,
        samples: Sequence[pb.TrainSample],
        *,
        loss: pb.LossConfig | str | None = None,
        weight: float = 0.0,
        request_id: str | None = None,
        timeout_s: float = DEFAULT_TRAIN_TIMEOUT_S,
    ) -> pb.ForwardBackwardResponse:
        """Accumulate the gradient of one batch (no update; see ``optim_step``).
        ``weight``: the experiment's fair-share weight in the trainer's queue (0 = 1)."""
        request = pb.ForwardBackwardRequest(
            request_id=_rid(request_id),
            adapter_id=adapter_id,
            samples=list(samples),
            loss=loss_config(loss),
            weight=weight,
        )
        return await self._unary(self.stub.ForwardBackward, request, timeout_s)

    async def optim_step(
        self,
        adapter_id: str,
        *,
        learning_rate: float = 0.0,
        request_id: str | None = None,
        timeout_s: float = DEFAULT_TRAIN_TIMEOUT_S,
    ) -> pb.OptimStepResponse:
        """Apply the accumulated gradient (``learning_rate`` > 0 overrides the
        adapter's for this step)."""
        request = pb.OptimStepRequest(
            request_id=_rid(request_id), adapter_id=adapter_id, learning_rate=learning_rate
        )
        return await self._unary(self.stub.OptimStep, request, timeout_s)

    async def train_step(
        self,
        adapter_id: str,
        samples: Sequence[pb.TrainSample],
        *,
        loss: pb.LossConfig | str | None = None,
        learning_rate: float = 0.0,
        weight: float = 0.0,
        request_id: str | None = None,
        timeout_s: float = DEFAULT_TRAIN_TIMEOUT_S,
    ) -> pb.TrainStepResponse:
        """``forward_backward`` + ``optim_step`` in one call (fused with other
        adapters' concurrent steps on the trainer). ``weight`` as in
        ``forward_backward``."""
        request = pb.TrainStepRequest(
            request_id=_rid(request_id),
            adapter_id=adapter_id,
            samples=list(samples),
            loss=loss_config(loss),
            learning_rate=learning_rate,
            weight=weight,
        )
        return await self._unary(self.stub.TrainStep, request, timeout_s)

    async def compute_logprobs(
        self,
        sequences: Sequence[SequenceLike],
        *,
        adapter_id: str = "",
        timeout_s: float = DEFAULT_TRAIN_TIMEOUT_S,
    ) -> list[list[float]]:
        """The logprob of each completion token of each sequence under
        ``adapter_id`` ("" = the base model)."""
        request = pb.ComputeLogprobsRequest(
            adapter_id=adapter_id, sequences=[token_sequence(s) for s in sequences]
        )
        response = await self._unary(self.stub.ComputeLogprobs, request, timeout_s)
        return [list(s.logprobs) for s in response.sequences]

    # versions and state

    async def save_version(
        self,
        adapter_id: str,
        *,
        expected_parent_version: int,
        registry_adapter_id: str = "",
        training_step: int = 0,
        metrics: Mapping[str, float] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> adapter_pb2.AdapterRef:
        """Write the adapter into the node's cache and publish it to the registry by
        reference; returns the new version's ``AdapterRef``."""
        request = pb.SaveVersionRequest(
            request_id=_rid(request_id),
            adapter_id=adapter_id,
            registry_adapter_id=registry_adapter_id,
            expected_parent_version=expected_parent_version,
            training_step=training_step,
            metrics=dict(metrics or {}),
        )
        return (await self._unary(self.stub.SaveVersion, request, timeout_s)).ref

    async def save_state(
        self, adapter_id: str, *, request_id: str | None = None, timeout_s: float | None = None
    ) -> pb.SaveStateResponse:
        """Checkpoint weights + optimizer state + step; returns its uri and sha256."""
        request = pb.SaveStateRequest(request_id=_rid(request_id), adapter_id=adapter_id)
        return await self._unary(self.stub.SaveState, request, timeout_s)

    async def load_state(
        self,
        adapter_id: str,
        uri: str,
        sha256: str,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.AdapterInfo:
        """Restore a ``save_state`` checkpoint (creating or replacing the adapter)."""
        request = pb.LoadStateRequest(
            request_id=_rid(request_id), adapter_id=adapter_id, uri=uri, sha256=sha256
        )
        return (await self._unary(self.stub.LoadState, request, timeout_s)).adapter


class TrainerClient(SyncBridge):
    """Blocking twin of `AsyncTrainerClient`: ``TrainerClient(address)``."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncTrainerClient(address, **kwargs))
