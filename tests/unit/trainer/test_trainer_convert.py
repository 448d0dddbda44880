"""The trainer's proto <-> engine conversion: "0 means the default" applied once."""

from __future__ import annotations

import pytest

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.trainer.v1 import trainer_pb2 as pb
from lorafleet.core.errors import InvalidArgument
from lorafleet.lora.errors import LoraSpecError
from lorafleet.lora.types import LossKind, OptimizerConfig
from lorafleet.trainer import convert


def test_lora_spec_round_trip():
    proto = adapter_pb2.LoraSpec(
        rank=8, alpha=16, target_modules=["q_proj", "v_proj"], dropout=0.1, use_rslora=True
    )
    spec = convert.lora_spec_from_pb(proto)
    assert (spec.rank, spec.alpha, spec.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert spec.use_rslora and spec.dropout == pytest.approx(0.1)
    assert convert.lora_spec_to_pb(spec) == proto


def test_missing_lora_spec_is_invalid_with_reason():
    with pytest.raises(LoraSpecError) as e:
        convert.lora_spec_from_pb(adapter_pb2.LoraSpec())
    assert isinstance(e.value, InvalidArgument) and e.value.reason == "RANK_TOO_SMALL"


def test_optimizer_defaults():
    assert convert.optimizer_from_pb(pb.CreateAdapterRequest()) == OptimizerConfig()
    cfg = convert.optimizer_from_pb(
        pb.CreateAdapterRequest(optimizer=pb.OptimizerConfig(learning_rate=3e-3))
    )
    assert cfg == OptimizerConfig(
        learning_rate=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=0.0
    )
    assert convert.optimizer_to_pb(cfg).learning_rate == pytest.approx(3e-3)


def test_loss_defaults_and_kinds():
    loss = convert.loss_from_pb(pb.LossConfig())
    assert (loss.kind, loss.clip_low, loss.clip_high, loss.kl_coef) == (
        LossKind.POLICY_GRADIENT,
        0.2,
        0.2,
        0.0,
    )
    loss = convert.loss_from_pb(
        pb.LossConfig(kind=pb.LOSS_KIND_CROSS_ENTROPY, clip_high=0.28, kl_coef=0.05)
    )
    assert (loss.kind, loss.clip_high, loss.kl_coef) == (LossKind.CROSS_ENTROPY, 0.28, 0.05)
    with pytest.raises(InvalidArgument) as e:
        convert.loss_from_pb(pb.LossConfig(kind=99))
    assert e.value.reason == "INVALID_LOSS_CONFIG"


def test_train_request_mapping():
    request = pb.TrainStepRequest(request_id="r1", adapter_id="exp", learning_rate=0.0)
    s = request.samples.add(sampling_logprobs=[-0.5, -1.0], advantage=1.5, policy_version=3)
    s.sequence.token_ids.extend([1, 2, 3, 4])
    s.sequence.prompt_length = 2
    req = convert.train_request_from_pb(request, with_learning_rate=True)
    assert req.adapter == "exp" and req.request_id == "r1" and req.learning_rate is None
    (sample,) = req.samples
    assert sample.sequence.token_ids == (1, 2, 3, 4) and sample.sequence.completion_length == 2
    assert sample.sampling_logprobs_C == (-0.5, -1.0) and sample.policy_version == 3
    request.learning_rate = 0.01
    assert convert.train_request_from_pb(request, with_learning_rate=True).learning_rate == 0.01


@pytest.mark.parametrize("kind", [pb.TrainStepRequest, pb.ForwardBackwardRequest])
def test_train_request_weight(kind):
    request = kind(adapter_id="exp")
    assert convert.train_request_from_pb(request, with_learning_rate=False).weight == 1.0
    request.weight = 2.5
    assert convert.train_request_from_pb(request, with_learning_rate=False).weight == 2.5
    for bad in (-1.0, float("nan"), float("inf")):
        request.weight = bad
        with pytest.raises(InvalidArgument) as e:
            convert.train_request_from_pb(request, with_learning_rate=False)
        assert e.value.reason == "INVALID_WEIGHT"
