"""Named data of the training engine (torch-free).

Shape suffixes name ragged axes: ``B`` sequences of one request, ``T`` tokens of
a sequence, ``C`` completion tokens of a sequence (the tokens after
``prompt_length``; losses and logprobs cover exactly these). They mirror the
trainer proto (``TrainSample``, ``TokenSequence``) one to one, so the servicer
only converts, never reshapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lorafleet.core.errors import LorafleetError
from lorafleet.lora.spec import LoraSpec


class LossKind(StrEnum):
    POLICY_GRADIENT = "policy_gradient"
    """Token-level clipped importance-weighted policy gradient (GRPO / PPO)."""
    CROSS_ENTROPY = "cross_entropy"
    """Supervised next-token loss on the completion tokens (SFT)."""


@dataclass(frozen=True)
class TokenSequence:
    """A prompt followed by its completion, as token ids."""

    token_ids: tuple[int, ...]
    """All tokens, prompt first."""
    prompt_length: int
    """How many leading tokens are the prompt (>= 1: the first completion token
    needs at least one token of context)."""

    def __post_init__(self) -> None:
        if not isinstance(self.token_ids, tuple):
            object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))

    @property
    def completion_length(self) -> int:
        return len(self.token_ids) - self.prompt_length


@dataclass(frozen=True)
class TrainSample:
    """One training sequence with its RL signal."""

    sequence: TokenSequence
    sampling_logprobs_C: tuple[float, ...] = ()
    """The rollout engine's logprob of each completion token; required by the
    policy-gradient loss unless it is ``on_policy``, optional for cross-entropy
    (where given, they only feed the ``logprob_gap`` metric)."""
    advantage: float = 0.0
    """Sequence-level advantage (GRPO: group-normalised reward), applied to
    every completion token."""
    policy_version: int = 0
    """The adapter version that generated the sample (staleness accounting)."""

    def __post_init__(self) -> None:
        if not isinstance(self.sampling_logprobs_C, tuple):
            object.__setattr__(
                self, "sampling_logprobs_C", tuple(float(x) for x in self.sampling_logprobs_C)
            )


@dataclass(frozen=True)
class LossConfig:
    """Which loss a request trains with. Defaults are applied here, once; the
    servicer maps the proto's "0 means default" onto ``None``-free values."""

    kind: LossKind = LossKind.POLICY_GRADIENT
    clip_low: float = 0.2
    """Ratios below ``1 - clip_low`` are clipped."""
    clip_high: float = 0.2
    """Ratios above ``1 + clip_high`` are clipped (DAPO raises this one)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimate to the base model (the same model with the
    adapter off); 0 skips the extra no-grad forward pass."""
    on_policy: bool = False
    """The samples came from the very weights being trained: the importance
    ratio uses the trainer's own (detached) logprobs, so it is exactly 1; the
    sampling logprobs only feed ``logprob_gap`` and may be left out."""


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters of one adapter."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Clip the adapter's gradient L2 norm to this; 0 disables clipping."""

    def to_dict(self) -> dict[str, float]:
        return {
            "learning_rate": self.learning_rate,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizerConfig:
        return cls(**{k: float(v) for k, v in data.items()})


@dataclass(frozen=True)
class TrainRequest:
    """One adapter's batch for one ForwardBackward / TrainStep."""

    adapter: str
    samples: tuple[TrainSample, ...]
    loss: LossConfig = field(default_factory=LossConfig)
    learning_rate: float | None = None
    """TrainStep only: override the adapter's learning rate for this step."""
    request_id: str = ""
    weight: float = 1.0
    """Fair-share weight of the experiment it trains: a queue that serves the
    adapter with the fewest optimizer steps first counts steps / weight."""

    def __post_init__(self) -> None:
        if not isinstance(self.samples, tuple):
            object.__setattr__(self, "samples", tuple(self.samples))

    @property
    def num_tokens(self) -> int:
        return sum(len(s.sequence.token_ids) for s in self.samples)


@dataclass(frozen=True)
class LogprobRequest:
    """Score sequences under an adapter (or the base model when ``adapter`` is None)."""

    adapter: str | None
    sequences: tuple[TokenSequence, ...]
    request_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.sequences, tuple):
            object.__setattr__(self, "sequences", tuple(self.sequences))

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass(frozen=True)
class TrainMetrics:
    """What one request's forward/backward computed (means over its loss tokens)."""

    loss: float
    kl: float
    """Mean k3 estimate of KL(policy || base); 0 when ``kl_coef`` is 0."""
    clip_fraction: float
    """Fraction of loss tokens whose clipped objective was the active one (their
    policy-gradient is zero this step)."""
    grad_norm: float
    """L2 norm of the adapter's accumulated gradient after this backward."""
    entropy: float
    logprob_gap: float | None
    """Mean |sampling logprob - trainer logprob| over the loss tokens that came
    with a sampling logprob; None when none did."""
    num_sequences: int
    num_loss_tokens: int
    fused_batch_adapters: int
    """How many adapters shared the forward/backward pass this ran in."""


@dataclass(frozen=True)
class ForwardBackwardResult:
    request_id: str
    adapter: str
    metrics: TrainMetrics


@dataclass(frozen=True)
class OptimStepResult:
    adapter: str
    step: int
    """Optimizer steps applied so far."""
    grad_norm: float
    """Gradient L2 norm before clipping (non-finite when the step was skipped)."""
    applied: bool
    """False when the step was skipped (no or non-finite gradient); parameters and
    optimizer state are then unchanged."""


@dataclass(frozen=True)
class TrainStepResult:
    request_id: str
    adapter: str
    metrics: TrainMetrics
    step: int
    applied: bool


@dataclass(frozen=True)
class LogprobResult:
    request_id: str
    adapter: str | None
    logprobs_B_C: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class RequestError:
    """A request that failed alone; the rest of its fused batch went on."""

    request_id: str
    adapter: str | None
    error: LorafleetError

    @property
    def reason(self) -> str:
        return self.error.reason


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    spec: LoraSpec
    optimizer: OptimizerConfig
    step: int
    parameter_count: int
    parameter_bytes: int
    optimizer_state_bytes: int
    gradient_bytes: int
    """Bytes of gradients currently held (0 between steps: grads are freed)."""

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.optimizer_state_bytes + self.gradient_bytes


@dataclass(frozen=True)
class FileDigest:
    name: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class SavedAdapter:
    """Where an adapter version was written and what its bytes hash to
    (the fields of the registry's ``AdapterRef``)."""

    directory: str
    files: tuple[FileDigest, ...]
    sha256: str
    """sha256 of the manifest lines "<name>\\t<sha256>\\t<size>\\n", sorted by name."""
    size_bytes: int
    spec: LoraSpec
    base_model: str
