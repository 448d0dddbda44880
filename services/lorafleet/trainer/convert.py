"""Proto <-> engine types of the trainer. Pure conversion: the proto's "0 means
the default" rules are applied here, once, so the engine only sees real values.

Defaults decided here (the proto leaves them to the server):

- ``OptimizerConfig`` left unset on CreateAdapter -> the engine's defaults
  (AdamW lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay, clip at 1.0); when
  set, beta1/beta2/eps of 0 mean 0.9/0.999/1e-8 and ``max_grad_norm`` 0 disables
  clipping, as the proto documents.
- ``LossConfig.kind`` UNSPECIFIED -> the policy-gradient (GRPO) loss, the RL
  default; clip_low/clip_high of 0 mean 0.2.
- A learning rate of 0 on TrainStep/OptimStep means "the adapter's own".
- A weight of 0 on TrainStep/ForwardBackward means 1.
"""

from __future__ import annotations

import math

from lorafleet.api.common.v1 import adapter_pb2, metrics_pb2, sampling_pb2
from lorafleet.api.trainer.v1 import trainer_pb2 as pb
from lorafleet.core.errors import InvalidArgument
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.types import (
    AdapterInfo,
    LossConfig,
    LossKind,
    OptimizerConfig,
    TokenSequence,
    TrainMetrics,
    TrainRequest,
    TrainSample,
)

DEFAULT_CLIP = 0.2


def lora_spec_from_pb(spec: adapter_pb2.LoraSpec) -> LoraSpec:
    """Raises ``LoraSpecError`` (INVALID_ARGUMENT) for an invalid spec."""
    return LoraSpec(
        rank=int(spec.rank),
        alpha=float(spec.alpha),
        target_modules=tuple(spec.target_modules),
        dropout=float(spec.dropout),
        use_rslora=bool(spec.use_rslora),
    )


def lora_spec_to_pb(spec: LoraSpec) -> adapter_pb2.LoraSpec:
    return adapter_pb2.LoraSpec(
        rank=spec.rank,
        alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        dropout=spec.dropout,
        use_rslora=spec.use_rslora,
    )


def optimizer_from_pb(request: pb.CreateAdapterRequest) -> OptimizerConfig:
    if not request.HasField("optimizer"):
        return OptimizerConfig()
    o = request.optimizer
    return OptimizerConfig(
        learning_rate=o.learning_rate,
        beta1=o.beta1 or 0.9,
        beta2=o.beta2 or 0.999,
        eps=o.eps or 1e-8,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
    )


def optimizer_to_pb(cfg: OptimizerConfig) -> pb.OptimizerConfig:
    return pb.OptimizerConfig(
        learning_rate=cfg.learning_rate,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
    )


def loss_from_pb(loss: pb.LossConfig) -> LossConfig:
    if loss.kind in (pb.LOSS_KIND_UNSPECIFIED, pb.LOSS_KIND_POLICY_GRADIENT):
        kind = LossKind.POLICY_GRADIENT
    elif loss.kind == pb.LOSS_KIND_CROSS_ENTROPY:
        kind = LossKind.CROSS_ENTROPY
    else:
        raise InvalidArgument(
            f"unknown loss kind {loss.kind}",
            reason="INVALID_LOSS_CONFIG",
            metadata={"field": "loss.kind"},
        )
    return LossConfig(
        kind=kind,
        clip_low=loss.clip_low or DEFAULT_CLIP,
        clip_high=loss.clip_high or DEFAULT_CLIP,
        kl_coef=loss.kl_coef,
        on_policy=loss.on_policy,
    )


def sequence_from_pb(seq: sampling_pb2.TokenSequence) -> TokenSequence:
    return TokenSequence(tuple(seq.token_ids), int(seq.prompt_length))


def train_request_from_pb(
    request: pb.ForwardBackwardRequest | pb.TrainStepRequest, *, with_learning_rate: bool
) -> TrainRequest:
    samples = tuple(
        TrainSample(
            sequence=sequence_from_pb(s.sequence),
            sampling_logprobs_C=tuple(s.sampling_logprobs),
            advantage=float(s.advantage),
            policy_version=int(s.policy_version),
        )
        for s in request.samples
    )
    lr = None
    if with_learning_rate and request.learning_rate:  # type: ignore[union-attr]
        lr = float(request.learning_rate)  # type: ignore[union-attr]
    return TrainRequest(
        adapter=request.adapter_id,
        samples=samples,
        loss=loss_from_pb(request.loss),
        learning_rate=lr,
        request_id=request.request_id,
        weight=weight_from_pb(request.weight),
    )


def weight_from_pb(weight: float) -> float:
    """A request's fair-share weight: 0 (unset) means 1; otherwise it must be a
    finite number > 0 (INVALID_ARGUMENT before the request is queued)."""
    if weight == 0:
        return 1.0
    if not (weight > 0 and math.isfinite(weight)):
        raise InvalidArgument(
            f"weight must be a finite number > 0 (or 0 for 1), got {weight}",
            reason="INVALID_WEIGHT",
            metadata={"field": "weight"},
        )
    return float(weight)


def metrics_to_pb(m: TrainMetrics) -> metrics_pb2.TrainMetrics:
    return metrics_pb2.TrainMetrics(
        loss=m.loss,
        kl=m.kl,
        clip_fraction=m.clip_fraction,
        grad_norm=m.grad_norm,
        entropy=m.entropy,
        logprob_gap=m.logprob_gap,  # None leaves the optional field unset
        num_sequences=m.num_sequences,
        num_loss_tokens=m.num_loss_tokens,
        fused_batch_adapters=m.fused_batch_adapters,
    )


def adapter_info_to_pb(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        adapter_id=info.name,
        lora=lora_spec_to_pb(info.spec),
        optimizer=optimizer_to_pb(info.optimizer),
        step=info.step,
        parameter_count=info.parameter_count,
        parameter_bytes=info.parameter_bytes,
        optimizer_state_bytes=info.optimizer_state_bytes,
        pending_gradient_bytes=info.gradient_bytes,
    )
