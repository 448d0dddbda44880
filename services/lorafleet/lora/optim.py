"""One AdamW per adapter: its own state, learning rate, weight decay and clipping.

Adapters never share an optimizer, so nothing one adapter's step does (a NaN
gradient, an exploding norm, a learning-rate change) can reach another's
parameters or moments. A step whose gradient norm is not finite is skipped
whole: parameters, moments and the step count stay exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lorafleet.lora.errors import invalid
from lorafleet.lora.types import OptimizerConfig, OptimStepResult

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def validate_optimizer_config(cfg: OptimizerConfig) -> None:
    checks = [
        (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate), "learning_rate must be > 0"),
        (0.0 <= cfg.beta1 < 1.0, "beta1 must be in [0, 1)"),
        (0.0 <= cfg.beta2 < 1.0, "beta2 must be in [0, 1)"),
        (cfg.eps > 0, "eps must be > 0"),
        (cfg.weight_decay >= 0, "weight_decay must be >= 0"),
        (cfg.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 disables clipping)"),
    ]
    for ok, message in checks:
        if not ok:
            raise invalid(message, "INVALID_OPTIMIZER_CONFIG")


class AdapterOptimizer:
    """AdamW over exactly one adapter's parameters."""

    def __init__(self, params: Sequence[nn.Parameter], config: OptimizerConfig) -> None:
        validate_optimizer_config(config)
        self.params = list(params)
        self.config = config
        self.step_count = 0
        # foreach: a handful of multi-tensor kernels instead of ~10 ops per parameter;
        # on CPU this is what keeps N small optimizer steps cheap next to one fused pass.
        self._opt = torch.optim.AdamW(
            self.params,
            lr=config.learning_rate,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            weight_decay=config.weight_decay,
            foreach=True,
        )

    def has_grad(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def grad_norm(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.get_total_norm(grads, foreach=True))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, learning_rate: float | None = None) -> OptimStepResult:
        """Clip, apply and clear the accumulated gradient; skipped (``applied=False``,
        state untouched, gradient cleared) when there is none or its norm is not finite.

        ``learning_rate`` overrides the configured rate for this step only.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return OptimStepResult(adapter="", step=self.step_count, grad_norm=0.0, applied=False)
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        norm_f = float(norm)
        if not math.isfinite(norm_f):
            self.zero_grad()
            return OptimStepResult(adapter="", step=self.step_count, grad_norm=norm_f,
                                   applied=False)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.max_grad_norm, norm,
                                                 foreach=True)
        group = self._opt.param_groups[0]
        if learning_rate is not None:
            if not (learning_rate > 0 and math.isfinite(learning_rate)):
                self.zero_grad()
                raise invalid(f"learning_rate must be > 0, got {learning_rate}",
                              "INVALID_OPTIMIZER_CONFIG")
            group["lr"] = learning_rate
        try:
            self._opt.step()
        finally:
            group["lr"] = self.config.learning_rate
        self.zero_grad()
        self.step_count += 1
        return OptimStepResult(adapter="", step=self.step_count, grad_norm=norm_f, applied=True)

    def state_bytes(self) -> int:
        total = 0
        for state in self._opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Moments by ``"<param index>.<name>"``: plain tensors, no pickle."""
        out: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.params):
            state = self._opt.state.get(p)
            if not state:
                continue
            for k in _STATE_KEYS:
                v = state[k]
                t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                out[f"{i}.{k}"] = t.detach().to("cpu", copy=True).contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        """Inverse of :meth:`state_tensors`; shapes checked before anything changes."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            idx_s, _, name = key.partition(".")
            if not idx_s.isdigit() or name not in _STATE_KEYS or int(idx_s) >= len(self.params):
                raise invalid(f"unexpected optimizer tensor {key!r}", "INVALID_STATE")
            state.setdefault(int(idx_s), {})[name] = t
        for i, s in state.items():
            if set(s) != set(_STATE_KEYS):
                raise invalid(f"optimizer state of parameter {i} is incomplete", "INVALID_STATE")
            for k in ("exp_avg", "exp_avg_sq"):
                if tuple(s[k].shape) != tuple(self.params[i].shape):
                    raise invalid(f"optimizer tensor {i}.{k} has the wrong shape",
                                  "INVALID_STATE")
        sd = self._opt.state_dict()
        sd["state"] = {
            i: {k: (v.to(self.params[i].device) if k != "step" else v.to(torch.float32))
                for k, v in s.items()}
            for i, s in state.items()
        }
        self._opt.load_state_dict(sd)
        self.step_count = int(step_count)
