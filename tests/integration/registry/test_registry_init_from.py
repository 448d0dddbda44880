"""`ExperimentSpec.init_from` pinned against a real registry: the scheduler's
submit-time resolution of a selector to one version, the source's shape
adopted, and every bad reference refused with a reason."""

from __future__ import annotations

import pytest
from test_registry_api import publish

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.client.registry import parse_selector
from lorafleet.core.errors import InvalidArgument, NotFound
from lorafleet.scheduler.init_from import pin_init_from
from lorafleet.scheduler.nodes import NodeRpc


def spec_from(selector: str, **lora) -> pb.ExperimentSpec:
    out = pb.ExperimentSpec()
    out.environment.builtin.task = "count"
    out.init_from.CopyFrom(parse_selector(selector))
    for key, value in lora.items():
        setattr(out.lora, key, value)
    return out


@pytest.fixture
async def rpc(registry, adapter):
    for parent in range(3):
        await publish(registry, parent, seed=parent)
    await registry.client.set_alias("exp-1", "best", 2)
    client = NodeRpc(registry.address)
    try:
        yield client
    finally:
        await client.close()


async def test_selector_is_pinned_and_the_source_shape_adopted(rpc):
    pinned = await pin_init_from(spec_from("exp-1@best", dropout=0.1), rpc)
    assert pinned.init_from == adapter_pb2.AdapterSelector(adapter_id="exp-1", version=2)
    assert pinned.base_model == "tiny-llama"
    assert (pinned.lora.rank, pinned.lora.alpha) == (4, 8.0)
    assert list(pinned.lora.target_modules) == ["q_proj", "v_proj"]
    assert pinned.lora.dropout == pytest.approx(0.1)  # the new experiment's own

    latest = await pin_init_from(spec_from("exp-1"), rpc)
    assert latest.init_from.version == 3
    same_shape = await pin_init_from(spec_from("exp-1@1", rank=4, alpha=8.0), rpc)
    assert same_shape.init_from.version == 1


async def test_no_init_from_leaves_the_spec_alone(rpc):
    plain = pb.ExperimentSpec(base_model="tiny")
    assert await pin_init_from(plain, rpc) is plain


@pytest.mark.parametrize(
    ("selector", "registry_reason"),
    [
        ("nobody@1", "ADAPTER_NOT_FOUND"),
        ("exp-1@9", "VERSION_NOT_FOUND"),
        ("exp-1@prod", "ALIAS_NOT_FOUND"),
    ],
)
async def test_missing_sources_are_not_found(rpc, selector, registry_reason):
    with pytest.raises(NotFound) as info:
        await pin_init_from(spec_from(selector), rpc)
    assert info.value.reason == "INIT_FROM_NOT_FOUND"
    assert info.value.metadata["registry_reason"] == registry_reason
    assert selector in info.value.message


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.lora.__setattr__("rank", 8), "INIT_LORA_MISMATCH"),
        (lambda s: s.lora.target_modules.append("o_proj"), "INIT_LORA_MISMATCH"),
        (lambda s: s.lora.__setattr__("use_rslora", True), "INIT_LORA_MISMATCH"),
        (lambda s: s.__setattr__("base_model", "tiny"), "INIT_BASE_MODEL_MISMATCH"),
        (lambda s: s.init_from.__setattr__("adapter_id", ""), "INIT_FROM_INVALID"),
        (lambda s: s.init_from.__setattr__("version", 0), "INIT_FROM_INVALID"),
    ],
)
async def test_conflicting_specs_are_invalid_argument(rpc, mutate, reason):
    bad = spec_from("exp-1@2")
    mutate(bad)
    with pytest.raises(InvalidArgument) as info:
        await pin_init_from(bad, rpc)
    assert info.value.reason == reason
