"""The shape of one LoRA adapter, as PEFT's ``LoraConfig`` names it.

Torch-free on purpose (torch is imported only inside
:func:`default_target_modules`): the scheduler and the servicer's proto
conversion can validate specs without pulling in the engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lorafleet.lora.errors import LoraSpecError

if TYPE_CHECKING:
    from torch import nn

# Module names are Python identifiers or ModuleList indices joined by dots;
# anything else would not survive the PEFT key naming ("<path>.lora_A.weight").
_TARGET_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


@dataclass(frozen=True)
class LoraSpec:
    """One adapter's LoRA hyper-parameters; validated on construction."""

    rank: int
    """LoRA rank ``r`` (>= 1)."""
    alpha: float
    """Scaling numerator ``lora_alpha``; the update is scaled by :attr:`scaling`."""
    target_modules: tuple[str, ...] = field(default=())
    """Module names the adapter wraps, matched as PEFT matches a list: a module
    matches ``t`` when its path equals ``t`` or ends with ``"." + t``. Empty means
    the node's default set (see :func:`default_target_modules`)."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training (0 disables it)."""
    use_rslora: bool = False
    """Rank-stabilised scaling: alpha / sqrt(rank) instead of alpha / rank."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, tuple):
            # Accept any iterable of names (lists from JSON, protobuf repeated fields).
            names = (
                (self.target_modules,)
                if isinstance(self.target_modules, str)
                else tuple(self.target_modules)
            )
            object.__setattr__(self, "target_modules", names)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise LoraSpecError(f"rank must be an int, got {self.rank!r}", reason="INVALID_RANK")
        if self.rank < 1:
            raise LoraSpecError(f"rank must be >= 1, got {self.rank}", reason="RANK_TOO_SMALL")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)
                and self.alpha > 0):
            raise LoraSpecError(
                f"alpha must be a finite number > 0, got {self.alpha!r}", reason="INVALID_ALPHA"
            )
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise LoraSpecError(
                f"dropout must be in [0, 1), got {self.dropout!r}", reason="INVALID_DROPOUT"
            )
        seen: set[str] = set()
        for name in self.target_modules:
            if not isinstance(name, str) or not _TARGET_RE.match(name):
                raise LoraSpecError(
                    f"target module {name!r} is not a module name", reason="INVALID_TARGET_MODULE"
                )
            if name in seen:
                raise LoraSpecError(
                    f"target module {name!r} is listed twice", reason="DUPLICATE_TARGET_MODULE"
                )
            seen.add(name)

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies ``B @ A @ x`` by."""
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def with_default_targets(self, defaults: Sequence[str]) -> LoraSpec:
        """This spec with an empty target list replaced by ``defaults``."""
        if self.target_modules:
            return self
        return replace(self, target_modules=tuple(defaults))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraSpec:
        return cls(
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            target_modules=tuple(data.get("target_modules", ())),
            dropout=float(data.get("dropout", 0.0)),
            use_rslora=bool(data.get("use_rslora", False)),
        )


def module_matches(path: str, target: str) -> bool:
    """PEFT's rule for a list of target names: exact path or a dotted suffix."""
    return path == target or path.endswith("." + target)


def resolve_targets(
    spec: LoraSpec, linear_shapes: Mapping[str, tuple[int, int]]
) -> list[str]:
    """The module paths ``spec`` wraps, in model order.

    ``linear_shapes`` maps every wrappable linear module path to its
    ``(in_features, out_features)``. Raises ``LoraSpecError`` for a target that
    matches nothing (UNKNOWN_TARGET_MODULE) or a rank no target can hold
    (RANK_TOO_LARGE: a rank above min(in, out) adds parameters without adding rank).
    """
    paths: list[str] = []
    for target in spec.target_modules:
        if not any(module_matches(p, target) for p in linear_shapes):
            raise LoraSpecError(
                f"target module {target!r} matches no linear layer of the base model",
                reason="UNKNOWN_TARGET_MODULE",
                metadata={"target_module": target},
            )
    for path, (in_f, out_f) in linear_shapes.items():
        if any(module_matches(path, t) for t in spec.target_modules):
            if spec.rank > min(in_f, out_f):
                raise LoraSpecError(
                    f"rank {spec.rank} exceeds min(in, out) = {min(in_f, out_f)} of {path}",
                    reason="RANK_TOO_LARGE",
                    metadata={"module": path},
                )
            paths.append(path)
    return paths


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """All linear layers of the repeated transformer blocks (attention + MLP).

    For Llama: q, k, v, o, gate, up, down projections, in model order. Linear
    layers outside the blocks (``lm_head``, classifier heads, projectors) are left
    out, as PEFT's ``"all-linear"`` leaves out the output layer.
    """
    names: list[str] = []
    for path in _linear_shapes(model):
        parts = path.split(".")
        # Inside a block means "under a ModuleList index", e.g. model.layers.3.mlp.up_proj.
        if any(p.isdigit() for p in parts[:-1]) and parts[-1] not in names:
            names.append(parts[-1])
    return tuple(names)


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    from lorafleet.lora.layers import linear_shapes

    return linear_shapes(model)

