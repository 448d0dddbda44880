"""Multi-LoRA linear layers with per-row adapter routing.

One frozen base ``nn.Linear`` is shared by every adapter; each adapter adds its
own low-rank update ``scaling * B @ A @ x`` to the rows of the batch routed to it.
Which adapter each row uses lives in a :class:`Routing` that the owner sets on a
:class:`RoutingState` shared by all layers of one model before a forward pass, so
the HF model's own ``forward`` signature stays untouched (no extra kwargs threaded
through dozens of modules) and one grouping of rows serves every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.lora.spec import module_matches

# "auto" stacks adapters while their concatenated LoRA matmuls cost at most this
# fraction of the base matmul's FLOPs (see MultiLoraLinear._use_stacked).
STACKED_MAX_FLOP_RATIO = 0.25
# "auto" merges a one-adapter batch's update into the base weight on CPU once the
# LoRA matmuls' FLOPs reach this fraction of the base matmul's, and the batch has
# at least this many rows per unit of rank, so that the merge itself (rank x in x
# out) costs at most 1/8 of the matmul it serves (see MultiLoraLinear._merge_pays).
MERGED_MIN_FLOP_RATIO = 1 / 16
MERGED_MIN_ROWS_PER_RANK = 8


@dataclass(frozen=True)
class RowGroup:
    """The rows of one adapter in a batch."""

    key: str
    """The adapter's parameter key in every layer (a slot key, not the user name:
    user names may contain dots, which ``nn.ParameterDict`` rejects)."""
    rows: slice | torch.Tensor
    """A contiguous slice (views, no copy) or a LongTensor of row indices."""


class Routing:
    """Which adapter each batch row uses, grouped once per forward pass.

    Rows routed to ``None`` run the base model only. When each adapter's rows are
    one contiguous run (the engine always builds batches that way) layers use
    slices, which are views; otherwise they gather with index tensors.
    """

    def __init__(self, keys_per_row: Sequence[str | None], *, train: bool = False,
                 allow_stacked: bool | Callable[[], bool] = True,
                 device: torch.device | str | None = None) -> None:
        self.num_rows = len(keys_per_row)
        self.train = train
        """Apply LoRA dropout (the base model itself stays in eval mode)."""
        self._allow_stacked = allow_stacked
        runs: list[tuple[str | None, int, int]] = []
        for i, key in enumerate(keys_per_row):
            if runs and runs[-1][0] == key:
                runs[-1] = (key, runs[-1][1], i + 1)
            else:
                runs.append((key, i, i + 1))
        adapter_runs = [r for r in runs if r[0] is not None]
        keys = [r[0] for r in adapter_runs]
        self.contiguous = len(keys) == len(set(keys))
        self.runs: tuple[tuple[str | None, int], ...] = tuple((k, e - s) for k, s, e in runs)
        """Consecutive (key, row count) runs covering every row, for ``Tensor.split``."""
        groups: list[RowGroup] = []
        if self.contiguous:
            groups = [RowGroup(k, slice(s, e)) for k, s, e in adapter_runs]  # type: ignore[arg-type]
        else:
            by_key: dict[str, list[int]] = {}
            for i, key in enumerate(keys_per_row):
                if key is not None:
                    by_key.setdefault(key, []).append(i)
            groups = [
                RowGroup(k, torch.tensor(rows, dtype=torch.long, device=device))
                for k, rows in by_key.items()
            ]
        self.groups: tuple[RowGroup, ...] = tuple(groups)
        self._keys_per_row = tuple(keys_per_row)
        self._masks: dict[tuple, torch.Tensor] = {}

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(g.key for g in self.groups)

    @property
    def allow_stacked(self) -> bool:
        """False when an adapter in the batch holds a non-finite weight: stacking runs
        every row through every adapter's (masked) weights, and 0 * NaN is NaN, so
        only the grouped path keeps one broken adapter from touching other rows.
        A callable is evaluated once, on first use (single-adapter passes never ask)."""
        if callable(self._allow_stacked):
            self._allow_stacked = bool(self._allow_stacked())
        return self._allow_stacked

    def stacked_scale(self, keys: tuple[str, ...], ranks: tuple[int, ...],
                      scalings: tuple[float, ...], device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
        """``[N, 1, sum(ranks)]``: row n holds its adapter's scaling on that adapter's
        rank block and zeros elsewhere. Built once per routing and adapter set, then
        shared by every layer with the same set (cheap to rebuild, so never stale)."""
        cache_key = (keys, ranks, scalings, device, dtype)
        mask = self._masks.get(cache_key)
        if mask is None:
            offsets: dict[str, tuple[int, int, float]] = {}
            off = 0
            for k, r, sc in zip(keys, ranks, scalings, strict=True):
                offsets[k] = (off, off + r, sc)
                off += r
            m = np.zeros((self.num_rows, 1, off), dtype=np.float32)
            for n, k in enumerate(self._keys_per_row):
                if k in offsets:
                    lo, hi, sc = offsets[k]
                    m[n, 0, lo:hi] = sc
            mask = torch.from_numpy(m).to(device=device, dtype=dtype)
            self._masks[cache_key] = mask
        return mask


class RoutingState:
    """The routing of the forward pass in progress; one per model, shared by its layers.

    Not thread-safe by design: one model runs one forward at a time (the engine
    serialises torch work behind a lock).
    """

    def __init__(self, strategy: str = "auto", merge: str = "auto") -> None:
        self.current: Routing | None = None
        self.strategy = strategy
        """How layers combine several adapters in one batch: "stacked" (one matmul
        pair over all adapters' concatenated ranks, masked per row), "grouped"
        (a matmul pair per adapter on its rows) or "auto" (see
        :meth:`MultiLoraLinear.forward`)."""
        self.merge = merge
        """How a batch on one adapter applies it: "always" (one matmul with the
        weight ``W + scaling * B @ A``), "never" (the base matmul plus the two
        low-rank ones) or "auto" (see :meth:`MultiLoraLinear._merge_pays`)."""


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus any number of LoRA adapters, routed per row.

    Parameters live in ``lora_A[key]`` (``[r, in]``) and ``lora_B[key]``
    (``[out, r]``), the orientation of PEFT's ``lora_A.weight`` / ``lora_B.weight``,
    so saving is a rename. Adapters may differ in rank and scaling.
    """

    def __init__(self, base_layer: nn.Linear, state: RoutingState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        # A plain attribute, not a submodule: the state is shared by every layer.
        object.__setattr__(self, "_routing_state", state)

    @property
    def weight(self) -> torch.Tensor:
        # Some HF code reads `.weight` of projections (dtype / device probes).
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, key: str, rank: int, scaling: float, dropout: float = 0.0, *,
                    generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
        """Fresh weights as PEFT's ``init_lora_weights=True``: A kaiming-uniform
        (a = sqrt(5), the ``nn.Linear`` default), B zeros, so the adapter starts as
        the identity update."""
        if key in self.lora_A:
            raise KeyError(f"adapter key {key!r} already present")
        device = self.base_layer.weight.device
        # Drawn on CPU, then moved: the same seed gives the same weights on any device.
        a = torch.empty(rank, self.in_features, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        a = a.to(device)
        b = torch.zeros(self.out_features, rank, dtype=dtype, device=device)
        self.lora_A[key] = nn.Parameter(a)
        self.lora_B[key] = nn.Parameter(b)
        self.scaling[key] = float(scaling)
        self.dropout[key] = float(dropout)

    def remove_adapter(self, key: str) -> None:
        if key in self.lora_A:
            del self.lora_A[key]
            del self.lora_B[key]
            self.scaling.pop(key, None)
            self.dropout.pop(key, None)

    def has_adapter(self, key: str) -> bool:
        return key in self.lora_A

    def _add_delta(self, key: str, x: torch.Tensor, out: torch.Tensor, train: bool
                   ) -> torch.Tensor:
        """``out + scaling * B @ A @ x`` for the rows of one adapter."""
        a = self.lora_A[key]
        b = self.lora_B[key]
        shape = out.shape
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != a.dtype:
            x2 = x2.to(a.dtype)
        p = self.dropout[key]
        if train and p > 0.0:
            x2 = F.dropout(x2, p=p, training=True)
        # Scaling on the rank-r intermediate (cheapest place), and the add fused into
        # the second matmul (addmm): 3 kernels per adapter and layer.
        h = F.linear(x2, a) * self.scaling[key]
        out2 = out.reshape(-1, shape[-1])
        if out2.dtype == h.dtype:
            return torch.addmm(out2, h, b.t()).view(shape)
        return (out2 + F.linear(h, b).to(out2.dtype)).view(shape)

    def _merge_pays(self, key: str, train: bool, rows: int) -> bool:
        """Whether a batch on this one adapter should run as one matmul with the
        merged weight ``W + scaling * B @ A``.

        The merged forward costs the base matmul alone (the merge itself is
        ``rank x in x out``, once per forward, not per row); its backward adds a
        full-size weight-gradient matmul (``rows x in x out``) in place of the four
        low-rank ones. On CPU the low-rank matmuls (output or inner size = rank)
        run 5-10x below the base matmul's FLOP rate (tiny model, rank 8: 4.5-9.3
        against 50-56 GFLOP/s), so merging pays once they carry a sizeable share
        of the FLOPs: a train step of 16 prompts x 8 samples went from 315.6 to
        288.7 ms (medians of 12 interleaved steps). For most linears of a real
        model at a usual rank the share is a few percent (Qwen2.5-0.5B at rank 16:
        2-4%, only its narrow k and v projections reach 1/16) and the extra
        weight gradient would cost more than it saves; on GPUs the
        low-rank matmuls are cheap, so "auto" never merges there. A batch of few
        rows (one decode step of a few sequences) does not merge either: the merge
        would cost more than the low-rank matmuls it replaces. Dropout applies to
        the LoRA input only, so a pass with dropout never merges.
        """
        if train and self.dropout[key] > 0.0:
            return False
        merge = self._routing_state.merge  # type: ignore[attr-defined]
        if merge != "auto":
            return merge == "always"
        if self.base_layer.weight.device.type != "cpu":
            return False
        rank = int(self.lora_A[key].shape[0])
        return rows >= MERGED_MIN_ROWS_PER_RANK * rank and (
            rank * (self.in_features + self.out_features)
            >= MERGED_MIN_FLOP_RATIO * self.in_features * self.out_features)

    def _merged(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ (W + scaling * B @ A)^T + bias``: the same function as the base
        matmul plus the delta, rounded differently. Autograd takes the gradients
        of A and B through the merge (``B^T @ dW`` and ``dW @ A^T``, both small)."""
        base = self.base_layer
        a = self.lora_A[key]
        b = self.lora_B[key]
        weight = torch.addmm(base.weight.to(a.dtype), b, a, alpha=self.scaling[key])
        if x.dtype != weight.dtype:
            weight = weight.to(x.dtype)
        bias = base.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _use_stacked(self, keys: tuple[str, ...], train: bool) -> bool:
        strategy = self._routing_state.strategy  # type: ignore[attr-defined]
        if not self._routing_state.current.allow_stacked:  # type: ignore[attr-defined]
            return False
        if train and any(self.dropout[k] > 0 for k in keys):
            return False  # dropout differs per adapter; the grouped path applies it per group
        if strategy == "stacked":
            return True
        if strategy == "grouped":
            return False
        # auto: stacking multiplies LoRA FLOPs by the number of adapters (every row
        # meets every adapter's rank block, masked); worth it while those FLOPs stay
        # small next to the base matmul, which is where per-op overhead dominates.
        total_rank = sum(int(self.lora_A[k].shape[0]) for k in keys)
        return total_rank * (self.in_features + self.out_features) <= (
            STACKED_MAX_FLOP_RATIO * self.in_features * self.out_features)

    def _stacked(self, keys: tuple[str, ...], x: torch.Tensor, out: torch.Tensor,
                 routing: Routing) -> torch.Tensor:
        """All adapters of the batch in two matmuls: h = x @ [A_1; ...; A_k]^T, masked
        per row to its own adapter's rank block (times its scaling), then
        out + h @ [B_1, ..., B_k]^T. Masked blocks contribute exact zeros to every
        output and gradient, so each adapter's math is unchanged."""
        a = torch.cat([self.lora_A[k] for k in keys], dim=0)
        b = torch.cat([self.lora_B[k] for k in keys], dim=1)
        ranks = tuple(int(self.lora_A[k].shape[0]) for k in keys)
        scale = routing.stacked_scale(keys, ranks, tuple(self.scaling[k] for k in keys),
                                      a.device, a.dtype)
        xs = x if x.dtype == a.dtype else x.to(a.dtype)
        h = F.linear(xs, a)
        h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[-1])
        shape = out.shape
        out2 = out.reshape(-1, shape[-1])
        h2 = h.reshape(-1, h.shape[-1])
        if out2.dtype == h2.dtype:
            return torch.addmm(out2, h2, b.t()).view(shape)
        return (out2 + F.linear(h2, b).to(out2.dtype)).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing: Routing | None = self._routing_state.current  # type: ignore[attr-defined]
        if routing is None or not self.lora_A:
            return self.base_layer(x)
        if x.shape[0] != routing.num_rows:
            raise RuntimeError(
                f"routing covers {routing.num_rows} rows but the batch has {x.shape[0]}"
            )
        keys = tuple(g.key for g in routing.groups if g.key in self.lora_A)
        if not keys:
            return self.base_layer(x)
        runs = routing.runs
        if len(runs) == 1:  # the whole batch on one adapter: plain LoRA
            if self._merge_pays(keys[0], routing.train, x.numel() // self.in_features):
                return self._merged(keys[0], x)
            return self._add_delta(keys[0], x, self.base_layer(x), routing.train)
        out = self.base_layer(x)
        if self._use_stacked(keys, routing.train):
            return self._stacked(keys, x, out, routing)
        if routing.contiguous:
            # split + cat rather than slicing per adapter: the backward of a slice
            # materialises a zero tensor the size of the whole batch, once per adapter
            # and layer (quadratic in adapters); split's backward is a single cat.
            sizes = [n for _, n in runs]
            xs = x.split(sizes, dim=0)
            outs = out.split(sizes, dim=0)
            parts = []
            for (key, _), xi, oi in zip(runs, xs, outs, strict=True):
                if key is None or key not in self.lora_A:
                    parts.append(oi)
                else:
                    parts.append(self._add_delta(key, xi, oi, routing.train))
            return torch.cat(parts, dim=0)
        for g in routing.groups:
            if g.key not in self.lora_A:
                continue
            rows = g.rows
            xi = x.index_select(0, rows)  # type: ignore[arg-type]
            delta = self._add_delta(g.key, xi, torch.zeros_like(out[: xi.shape[0]]),
                                    routing.train)
            out = out.index_add(0, rows, delta)  # type: ignore[arg-type]
        return out

    def extra_repr(self) -> str:
        ranks = {k: int(v.shape[0]) for k, v in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}"


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every wrappable linear module path -> (in_features, out_features), in model order.

    Wrapped layers report under their own path (not ``...base_layer``), so the
    answer is the same before and after injection.
    """
    shapes: dict[str, tuple[int, int]] = {}
    for path, module in model.named_modules():
        wrapped = isinstance(module, MultiLoraLinear)
        plain = isinstance(module, nn.Linear) and not path.endswith(".base_layer")
        if wrapped or plain:
            shapes[path] = (module.in_features, module.out_features)
    return shapes


def inject_multi_lora(model: nn.Module, target_modules: Sequence[str],
                      state: RoutingState) -> dict[str, MultiLoraLinear]:
    """Replace every ``nn.Linear`` matching ``target_modules`` (PEFT list rule) by a
    :class:`MultiLoraLinear` in place, keeping its path, and return every
    multi-LoRA layer of the model by path (already wrapped ones included)."""
    layers: dict[str, MultiLoraLinear] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, MultiLoraLinear):
            layers[path] = module
            continue
        if not isinstance(module, nn.Linear) or path.endswith(".base_layer"):
            continue
        if not any(module_matches(path, t) for t in target_modules):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapped = MultiLoraLinear(module, state)
        setattr(parent, child, wrapped)
        layers[path] = wrapped
    return layers


def layers_by_path(model: nn.Module) -> Mapping[str, MultiLoraLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, MultiLoraLinear)}
