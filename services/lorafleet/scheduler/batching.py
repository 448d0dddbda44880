"""How one RL step's work is cut into requests that a node's fair-share gates
admit one at a time (see :mod:`lorafleet.scheduler.fairshare`).

A gate can only interleave experiments between requests: one oversized request
holds the engine for its whole length and every other experiment waits behind
it. So an experiment with huge batches sends its step as several requests, each
at most a fraction of the node's budget, and queues behind its own virtual time
chunk by chunk while light experiments get turns in between. A step that fits in
one chunk goes out exactly as it would without chunking.

Training chunks must add up to the same update as the whole batch: the trainer
averages each request's loss over its own loss tokens, so chunk k's advantages
and KL coefficient are scaled by (its loss tokens / the step's loss tokens),
which makes the sum of the chunks' gradients the whole batch's token-mean
gradient. The scale is positive, so PPO clipping decides exactly as it would
unchunked.

Samples whose advantage is 0 are not sent at all when the loss has no KL term
(:func:`drop_zero_advantage`): their gradient is exactly zero, and the same
scaling keeps the update of the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorafleet.api.common.v1 import metrics_pb2
from lorafleet.api.trainer.v1 import trainer_pb2

ROLLOUT_CHUNKS_PER_BUDGET = 4
"""A step's generation goes out in requests of at most 1/4 of the rollout budget."""

TRAIN_CHUNKS_PER_BUDGET = 8
"""A step's training batch goes out in ForwardBackward requests of at most 1/8 of
the train budget (8192 tokens at the default 65536: on 2 CPU cores about 0.4 s
of trainer time, so a light experiment's step never waits longer than that for a
hog's chunk; the default 16 x 8-sample step, ~4k tokens, stays one TrainStep)."""


def rollout_chunks(num_prompts: int, per_prompt_cost: int, max_cost: int) -> list[tuple[int, int]]:
    """[lo, hi) prompt ranges whose cost stays within ``max_cost`` (at least one
    prompt each: a prompt's samples are one GRPO group and stay together)."""
    size = max(1, max_cost // max(per_prompt_cost, 1))
    return [(lo, min(lo + size, num_prompts)) for lo in range(0, num_prompts, size)]


def sample_tokens(sample: trainer_pb2.TrainSample) -> int:
    """Prompt + completion tokens: what a sample costs the trainer's forward pass."""
    return len(sample.sequence.token_ids)


def loss_tokens(sample: trainer_pb2.TrainSample) -> int:
    """Completion tokens: what the trainer averages a request's loss over."""
    return len(sample.sequence.token_ids) - sample.sequence.prompt_length


def train_chunks(
    samples: Sequence[trainer_pb2.TrainSample], max_tokens: int
) -> list[list[trainer_pb2.TrainSample]]:
    """Consecutive runs of samples of at most ``max_tokens`` tokens each (a
    sample longer than that goes alone)."""
    chunks: list[list[trainer_pb2.TrainSample]] = []
    current: list[trainer_pb2.TrainSample] = []
    size = 0
    for sample in samples:
        n = sample_tokens(sample)
        if current and size + n > max_tokens:
            chunks.append(current)
            current, size = [], 0
        current.append(sample)
        size += n
    if current:
        chunks.append(current)
    return chunks


def scaled_chunk(
    chunk: Sequence[trainer_pb2.TrainSample],
    loss: trainer_pb2.LossConfig,
    step_loss_tokens: int,
) -> tuple[list[trainer_pb2.TrainSample], trainer_pb2.LossConfig]:
    """The chunk's samples and loss config scaled so that the chunks' gradients
    sum to the whole step's (see the module docstring). Policy-gradient loss only:
    a cross-entropy loss does not go through the advantages."""
    if loss.kind not in (trainer_pb2.LOSS_KIND_UNSPECIFIED, trainer_pb2.LOSS_KIND_POLICY_GRADIENT):
        raise ValueError("only a policy-gradient loss can be split into scaled chunks")
    share = sum(loss_tokens(s) for s in chunk) / max(step_loss_tokens, 1)
    chunk_loss = trainer_pb2.LossConfig()
    chunk_loss.CopyFrom(loss)
    chunk_loss.kl_coef = loss.kl_coef * share
    return _with_scaled_advantages(chunk, share), chunk_loss


def _with_scaled_advantages(
    samples: Sequence[trainer_pb2.TrainSample], share: float
) -> list[trainer_pb2.TrainSample]:
    """Copies of ``samples`` with their advantages times ``share`` (the caller's
    samples stay untouched)."""
    scaled = []
    for sample in samples:
        copy = trainer_pb2.TrainSample()
        copy.CopyFrom(sample)
        copy.advantage = sample.advantage * share
        scaled.append(copy)
    return scaled


def drop_zero_advantage(
    samples: Sequence[trainer_pb2.TrainSample], *, kl_coef: float
) -> tuple[list[trainer_pb2.TrainSample], int]:
    """The samples that carry a gradient, scaled so that training on them alone
    makes exactly the update of the whole batch; and how many were left out.

    Under the policy-gradient loss a sample with advantage 0 has per-token loss
    -0 * ratio: zero, and so is its gradient (GRPO gives a whole group advantage 0
    when its rewards are all equal, e.g. every sample correct). Its only effect is
    through the trainer's token mean, whose denominator counts its tokens; scaling
    the kept samples' advantages by (kept loss tokens / all loss tokens) restores
    that denominator (the same scaling as :func:`scaled_chunk`). With a KL term
    every sample has a gradient, so nothing is dropped. When every advantage is 0
    the shortest sample stays: its gradient is exactly zero, and the optimizer
    still takes the step it would have taken (AdamW moves on its moments).
    """
    if kl_coef != 0 or not samples:
        return list(samples), 0
    kept = [s for s in samples if s.advantage != 0.0]
    if len(kept) == len(samples):
        return list(samples), 0
    if not kept:
        kept = [min(samples, key=sample_tokens)]
    share = sum(loss_tokens(s) for s in kept) / max(sum(loss_tokens(s) for s in samples), 1)
    return _with_scaled_advantages(kept, share), len(samples) - len(kept)


def merge_train_metrics(
    parts: Sequence[metrics_pb2.TrainMetrics], grad_norm: float
) -> metrics_pb2.TrainMetrics:
    """One step's metrics from its chunks': the (already scaled) losses add up,
    per-token means are weighted by each chunk's loss tokens."""
    tokens = sum(p.num_loss_tokens for p in parts)
    weight = [p.num_loss_tokens / max(tokens, 1) for p in parts]

    def mean(field: str) -> float:
        return sum(getattr(p, field) * w for p, w in zip(parts, weight, strict=True))

    # Only chunks whose samples carried sampling logprobs measured the gap.
    gapped = [p for p in parts if p.HasField("logprob_gap")]
    gap_tokens = sum(p.num_loss_tokens for p in gapped)
    logprob_gap = (
        sum(p.logprob_gap * p.num_loss_tokens for p in gapped) / max(gap_tokens, 1)
        if gapped
        else None
    )
    return metrics_pb2.TrainMetrics(
        loss=sum(p.loss for p in parts),
        kl=mean("kl"),
        clip_fraction=mean("clip_fraction"),
        grad_norm=grad_norm,
        entropy=mean("entropy"),
        logprob_gap=logprob_gap,
        num_sequences=sum(p.num_sequences for p in parts),
        num_loss_tokens=tokens,
        fused_batch_adapters=max((p.fused_batch_adapters for p in parts), default=0),
    )
