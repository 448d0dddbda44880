"""A frozen base model carrying many LoRA adapters in fixed slots.

:class:`MultiLoraModel` owns the wrapped HF model: it injects multi-LoRA layers
where adapters need them, gives each adapter a slot (the node's capacity unit),
initialises, lists and removes adapter parameters, and sets the per-row routing
around forward passes. It knows nothing about losses or optimizers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorafleet.lora.errors import (
    adapter_exists,
    adapter_not_found,
    invalid,
    no_free_slot,
    rank_above_node_max,
)
from lorafleet.lora.layers import (
    MultiLoraLinear,
    Routing,
    RoutingState,
    inject_multi_lora,
    linear_shapes,
)
from lorafleet.lora.spec import LoraSpec, default_target_modules, resolve_targets

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


@dataclass
class _Adapter:
    name: str
    key: str
    spec: LoraSpec
    modules: tuple[str, ...]
    """Module paths the adapter wraps, in model order."""


class MultiLoraModel:
    """The base model plus its adapters. Base parameters never require grad."""

    def __init__(self, model: nn.Module, *, max_adapters: int = 8, max_rank: int = 64,
                 default_targets: Sequence[str] | None = None,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        if max_adapters < 1 or max_rank < 1:
            raise ValueError("max_adapters and max_rank must be >= 1")
        self.model = model
        model.requires_grad_(False)
        # Eval mode for good: base dropout off; LoRA dropout is switched by the
        # routing's `train` flag instead, so training never perturbs the base.
        model.eval()
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.adapter_dtype = adapter_dtype
        self.default_targets = tuple(default_targets or default_target_modules(model))
        self.state = RoutingState()
        # Shapes are taken before any injection so target resolution is stable.
        self._linear_shapes = linear_shapes(model)
        self._adapters: dict[str, _Adapter] = {}
        self._free_keys = [f"s{i}" for i in range(max_adapters)]
        self._finite: dict[str, tuple[tuple[int, ...], bool]] = {}

    # --- adapters -----------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    @property
    def slots_used(self) -> int:
        return len(self._adapters)

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def spec(self, name: str) -> LoraSpec:
        return self._get(name).spec

    def adapter_modules(self, name: str) -> tuple[str, ...]:
        return self._get(name).modules

    def resolve_spec(self, spec: LoraSpec) -> tuple[LoraSpec, list[str]]:
        """``spec`` with default targets filled in, and the module paths it wraps;
        raises ``LoraSpecError`` / ``FailedPrecondition`` without changing anything."""
        spec = spec.with_default_targets(self.default_targets)
        if spec.rank > self.max_rank:
            raise rank_above_node_max(spec.rank, self.max_rank)
        return spec, resolve_targets(spec, self._linear_shapes)

    def add_adapter(self, name: str, spec: LoraSpec, *, seed: int = 0) -> LoraSpec:
        """Add fresh adapter weights (PEFT's default init) in a free slot; returns the
        spec with its target modules resolved."""
        if not name:
            raise invalid("adapter name must not be empty", "INVALID_ADAPTER_NAME")
        if name in self._adapters:
            raise adapter_exists(name)
        spec, paths = self.resolve_spec(spec)
        if not self._free_keys:
            raise no_free_slot(name, self.max_adapters)
        key = self._free_keys.pop(0)
        layers = inject_multi_lora(self.model, paths, self.state)
        # One generator walked in model order: the same seed and spec give the same
        # weights whatever other adapters are loaded.
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        for path in paths:
            layers[path].add_adapter(key, spec.rank, spec.scaling, spec.dropout, generator=gen,
                                     dtype=self.adapter_dtype)
        self._adapters[name] = _Adapter(name, key, spec, tuple(paths))
        return spec

    def remove_adapter(self, name: str) -> None:
        adapter = self._get(name)
        for path in adapter.modules:
            self._layer(path).remove_adapter(adapter.key)
        del self._adapters[name]
        self._finite.pop(name, None)
        self._free_keys.append(adapter.key)
        self._free_keys.sort(key=lambda k: int(k[1:]))

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The adapter's parameters in a fixed order (model order, A before B); the
        optimizer state is indexed by this order."""
        adapter = self._get(name)
        params: list[nn.Parameter] = []
        for path in adapter.modules:
            layer = self._layer(path)
            params.append(layer.lora_A[adapter.key])
            params.append(layer.lora_B[adapter.key])
        return params

    def adapter_parameter_names(self, name: str) -> list[str]:
        """Names matching :meth:`adapter_parameters`: ``<module path>.lora_A.weight``
        (PEFT's key without the ``base_model.model.`` prefix)."""
        out: list[str] = []
        for path in self._get(name).modules:
            out += [path + LORA_A_SUFFIX, path + LORA_B_SUFFIX]
        return out

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the adapter's tensors, by PEFT-style name."""
        return {
            n: p.detach().to("cpu", copy=True).contiguous()
            for n, p in zip(self.adapter_parameter_names(name), self.adapter_parameters(name),
                            strict=True)
        }

    def load_adapter_state_dict(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (named as :meth:`adapter_state_dict`) into the adapter.
        Every parameter must be present with its exact shape; checked before any copy."""
        names = self.adapter_parameter_names(name)
        params = self.adapter_parameters(name)
        missing = [n for n in names if n not in tensors]
        extra = sorted(set(tensors) - set(names))
        if missing or extra:
            raise invalid(
                f"adapter tensors do not match the adapter's modules "
                f"(missing {missing[:3]}, unexpected {extra[:3]})",
                "ADAPTER_KEYS_MISMATCH",
            )
        for n, p in zip(names, params, strict=True):
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise invalid(
                    f"tensor {n} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}",
                    "ADAPTER_SHAPE_MISMATCH",
                )
        with torch.no_grad():
            for n, p in zip(names, params, strict=True):
                p.copy_(tensors[n].to(device=p.device, dtype=p.dtype))

    def parameter_count(self, name: str) -> int:
        return sum(p.numel() for p in self.adapter_parameters(name))

    def parameter_bytes(self, name: str) -> int:
        return sum(p.numel() * p.element_size() for p in self.adapter_parameters(name))

    def gradient_bytes(self, name: str) -> int:
        return sum(p.grad.numel() * p.grad.element_size()
                   for p in self.adapter_parameters(name) if p.grad is not None)

    def base_parameter_bytes(self) -> int:
        keys = {a.key for a in self._adapters.values()}
        total = 0
        seen: set[int] = set()
        for pname, p in self.model.named_parameters():
            if any(f".lora_A.{k}" in pname or f".lora_B.{k}" in pname for k in keys):
                continue
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
        return total

    # --- routing ------------------------------------------------------------------

    def make_routing(self, adapters_per_row: Sequence[str | None], *,
                     train: bool = False) -> Routing:
        keys = [None if n is None else self._get(n).key for n in adapters_per_row]
        names = {n for n in adapters_per_row if n is not None}
        return Routing(keys, train=train,
                       allow_stacked=lambda: all(self.adapter_is_finite(n) for n in names))

    def adapter_is_finite(self, name: str) -> bool:
        """Whether every weight of the adapter is finite. Cached against the tensors'
        in-place version counters, so it costs a reduction only after a change."""
        params = self.adapter_parameters(name)
        version = tuple(p._version for p in params)
        cached = self._finite.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        with torch.no_grad():
            norms = torch._foreach_norm(params)
            finite = bool(torch.isfinite(torch.stack(norms)).all())
        self._finite[name] = (version, finite)
        return finite

    @contextlib.contextmanager
    def routing(self, adapters_per_row: Sequence[str | None], *,
                train: bool = False) -> Iterator[Routing]:
        """Route row ``i`` of the next forward passes to ``adapters_per_row[i]``
        (``None``: base model only). ``train`` enables LoRA dropout."""
        routing = self.make_routing(adapters_per_row, train=train)
        previous = self.state.current
        self.state.current = routing
        try:
            yield routing
        finally:
            self.state.current = previous

    # Alias with the name the design notes use.
    set_routing = routing

    # --- helpers ------------------------------------------------------------------

    def _get(self, name: str) -> _Adapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise adapter_not_found(name) from None

    def _layer(self, path: str) -> MultiLoraLinear:
        layer = self.model.get_submodule(path)
        assert isinstance(layer, MultiLoraLinear)
        return layer
