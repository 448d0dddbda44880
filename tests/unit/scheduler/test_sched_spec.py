"""Spec validation: bad specs are refused with a reason, good ones get defaults."""

from __future__ import annotations

import pytest

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.core.errors import FailedPrecondition, InvalidArgument
from lorafleet.scheduler.spec import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_LEARNING_RATE,
    DEFAULT_LOGPROB_GAP_EVERY,
    normalise_spec,
)
from lorafleet.scheduler.types import NodeRecord

NODES = [NodeRecord("node-0", "r:1", "t:1", base_model="tiny", slots=4, max_rank=16)]


def spec(**algorithm) -> pb.ExperimentSpec:
    out = pb.ExperimentSpec(base_model="tiny")
    out.environment.builtin.task = "count"
    out.lora.rank = 8
    for key, value in algorithm.items():
        setattr(out.algorithm, key, value)
    return out


def test_defaults_are_filled_and_input_is_not_mutated():
    original = spec()
    normalised = normalise_spec(original, NODES)
    assert normalised.algorithm.group_size == DEFAULT_GROUP_SIZE
    assert normalised.algorithm.learning_rate == DEFAULT_LEARNING_RATE
    assert normalised.algorithm.algorithm == pb.ALGORITHM_GRPO
    assert normalised.algorithm.logprob_gap_every == DEFAULT_LOGPROB_GAP_EVERY
    assert normalised.lora.alpha == 16.0
    assert normalised.weight == 1.0
    assert original.algorithm.group_size == 0


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.environment.builtin.__setattr__("task", "nope"), "UNKNOWN_TASK"),
        (lambda s: s.environment.Clear(), "ENVIRONMENT_REQUIRED"),
        (lambda s: s.algorithm.__setattr__("learning_rate", -1e-3), "INVALID_LEARNING_RATE"),
        (lambda s: s.algorithm.__setattr__("group_size", 1), "GROUP_SIZE_TOO_SMALL"),
        (lambda s: s.__setattr__("base_model", ""), "BASE_MODEL_REQUIRED"),
        (lambda s: s.lora.__setattr__("rank", -2), "INVALID_RANK"),
        (lambda s: s.algorithm.__setattr__("max_staleness", 99), "INVALID_MAX_STALENESS"),
        (lambda s: s.algorithm.__setattr__("logprob_gap_every", -1), "INVALID_LOGPROB_GAP_EVERY"),
        (
            lambda s: s.environment.remote.__setattr__("address", "nohost"),
            "INVALID_ENVIRONMENT_ADDRESS",
        ),
        (lambda s: s.environment.builtin.params.update({"max_len": "x"}), "INVALID_TASK_PARAMS"),
    ],
)
def test_invalid_specs_are_invalid_argument_with_reason(mutate, reason):
    bad = spec()
    mutate(bad)
    with pytest.raises(InvalidArgument) as info:
        normalise_spec(bad, NODES)
    assert info.value.reason == reason


def test_rank_above_every_node_is_failed_precondition():
    bad = spec()
    bad.lora.rank = 64
    with pytest.raises(FailedPrecondition) as info:
        normalise_spec(bad, NODES)
    assert info.value.reason == "RANK_ABOVE_EVERY_NODE"


def test_unknown_base_model_is_failed_precondition():
    bad = spec()
    bad.base_model = "qwen"
    with pytest.raises(FailedPrecondition) as info:
        normalise_spec(bad, NODES)
    assert info.value.reason == "NO_NODE_FOR_BASE_MODEL"


def test_without_nodes_a_valid_spec_is_accepted_to_queue():
    big = spec()
    big.lora.rank = 64
    assert normalise_spec(big, []).lora.rank == 64
