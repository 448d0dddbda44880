"""`ExperimentSpec.init_from`: start an experiment from a registry version.

At submit the selector (a version, `latest` or a user alias) is pinned to one
version number, so an experiment that restarts or moves starts from the same
weights it was submitted with, whatever the alias points at by then. The
source adapter's base model and LoRA shape are the new experiment's: the
trainer loads the version's own files, so a spec that asks for another shape
is refused rather than silently overridden.
"""

from __future__ import annotations

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.registry.v1 import registry_pb2, registry_pb2_grpc
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.client.registry import selector_text
from lorafleet.core.errors import InvalidArgument, NotFound
from lorafleet.scheduler.nodes import NodeRpc


async def pin_init_from(spec: pb.ExperimentSpec, registry: NodeRpc) -> pb.ExperimentSpec:
    """A copy of `spec` whose `init_from` names one READY version, with the
    source's base model and LoRA shape filled in; `spec` itself when it has no
    `init_from`.

    Raises:
        InvalidArgument: INIT_FROM_INVALID (no adapter id, version < 1),
            INIT_BASE_MODEL_MISMATCH, INIT_LORA_MISMATCH.
        NotFound: INIT_FROM_NOT_FOUND (no such adapter, version or alias, or
            the version is not READY).
        Unavailable: the registry cannot be reached (nothing was created).
    """
    if not spec.HasField("init_from"):
        return spec
    selector = spec.init_from
    if not selector.adapter_id:
        raise InvalidArgument(
            "spec.init_from.adapter_id is required (e.g. 'exp-1a2b3c' with version 7 or"
            " alias 'best')",
            reason="INIT_FROM_INVALID",
        )
    if selector.WhichOneof("version_selector") == "version" and selector.version < 1:
        raise InvalidArgument(
            f"spec.init_from.version must be >= 1, got {selector.version}",
            reason="INIT_FROM_INVALID",
        )
    stub = registry.stub_for(registry_pb2_grpc.AdapterRegistryServiceStub)
    try:
        resolved = await registry.call(
            stub.ResolveVersion, registry_pb2.ResolveVersionRequest(selector=selector)
        )
    except NotFound as exc:
        raise NotFound(
            f"spec.init_from {selector_text(selector)}: {exc.message}",
            reason="INIT_FROM_NOT_FOUND",
            metadata={"init_from": selector_text(selector), "registry_reason": exc.reason},
        ) from exc
    return adopt_source(spec, resolved.ref)


def adopt_source(spec: pb.ExperimentSpec, source: adapter_pb2.AdapterRef) -> pb.ExperimentSpec:
    """`spec` pinned to the resolved version `source`, taking its base model and
    LoRA shape where the spec leaves them empty and refusing where it differs."""
    out = pb.ExperimentSpec()
    out.CopyFrom(spec)
    out.init_from.CopyFrom(
        adapter_pb2.AdapterSelector(adapter_id=source.adapter_id, version=source.version)
    )
    pinned = f"{source.adapter_id}@{source.version}"
    if out.base_model and out.base_model != source.base_model:
        raise InvalidArgument(
            f"spec.base_model is {out.base_model!r} but init_from {pinned} was trained on"
            f" {source.base_model!r}; leave base_model empty to take the source's",
            reason="INIT_BASE_MODEL_MISMATCH",
            metadata={"init_from": pinned, "source_base_model": source.base_model},
        )
    out.base_model = source.base_model
    _adopt_lora(out.lora, source.lora, pinned)
    return out


def _adopt_lora(lora: adapter_pb2.LoraSpec, source: adapter_pb2.LoraSpec, pinned: str) -> None:
    wanted = {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "target_modules": sorted(lora.target_modules),
        "use_rslora": lora.use_rslora,
    }
    have = {
        "rank": source.rank,
        "alpha": source.alpha,
        "target_modules": sorted(source.target_modules),
        "use_rslora": source.use_rslora,
    }
    # Zero / empty / false means "not set": take the source's.
    differing = [name for name, value in wanted.items() if value and value != have[name]]
    if differing:
        shown = ", ".join(f"{n}={wanted[n]} (source {have[n]})" for n in differing)
        raise InvalidArgument(
            f"spec.lora differs from init_from {pinned}'s: {shown}; the weights are loaded"
            " as they were trained, so leave these fields empty",
            reason="INIT_LORA_MISMATCH",
            metadata={"init_from": pinned, "fields": ",".join(differing)},
        )
    dropout = lora.dropout
    lora.CopyFrom(source)
    # Dropout acts only while training: the new experiment may choose its own.
    lora.dropout = dropout
