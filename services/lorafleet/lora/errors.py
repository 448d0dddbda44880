"""Errors of the multi-LoRA engine, as values of the mesh's one error root.

Each error carries the gRPC code the trainer servicer will send and a stable
``reason``; the engine returns them per request (never raising out of a fused
batch), so the servicer maps them without knowing the engine's internals.
"""

from __future__ import annotations

from lorafleet.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LorafleetError,
    NotFound,
    ResourceExhausted,
)


class LoraSpecError(InvalidArgument, ValueError):
    """A LoRA spec that cannot be built (bad rank, alpha, dropout or target module).

    Also a ``ValueError`` so callers that validate specs without the mesh in mind
    (notebooks, config loaders) can catch the usual exception.
    """

    reason = "INVALID_LORA_SPEC"


def adapter_not_found(name: str) -> NotFound:
    return NotFound(f"adapter {name!r} is not loaded here", reason="ADAPTER_NOT_FOUND",
                    metadata={"adapter": name})


def adapter_exists(name: str) -> AlreadyExists:
    return AlreadyExists(f"adapter {name!r} is already loaded", reason="ADAPTER_EXISTS",
                         metadata={"adapter": name})


def no_free_slot(name: str, slots: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"no free adapter slot for {name!r}: all {slots} slots are in use",
        reason="NO_FREE_SLOT",
        metadata={"adapter": name, "slots_total": str(slots)},
    )


def pass_out_of_memory(micro_batch_tokens: int, device: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"the training pass ran out of memory on {device} with micro-batches of "
        f"{micro_batch_tokens} padded tokens: lower the trainer's micro_batch_tokens "
        "(LORAFLEET_TRAINER_MICRO_BATCH_TOKENS, or LORAFLEET_NODE_MICRO_BATCH_TOKENS on a "
        "co-located node), or send shorter sequences",
        reason="TRAIN_PASS_OUT_OF_MEMORY",
        metadata={"micro_batch_tokens": str(micro_batch_tokens), "device": device},
    )


def rank_above_node_max(rank: int, max_rank: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"LoRA rank {rank} is above this node's maximum {max_rank}",
        reason="RANK_ABOVE_NODE_MAX",
        metadata={"rank": str(rank), "max_rank": str(max_rank)},
    )


def invalid(message: str, reason: str, **metadata: object) -> InvalidArgument:
    """An INVALID_ARGUMENT for a malformed request (shapes, token ids, configs)."""
    return InvalidArgument(message, reason=reason,
                           metadata={k: str(v) for k, v in metadata.items()})


__all__ = [
    "LoraSpecError",
    "LorafleetError",
    "adapter_exists",
    "adapter_not_found",
    "invalid",
    "no_free_slot",
    "rank_above_node_max",
]
