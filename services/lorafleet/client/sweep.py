"""A sweep: one base ExperimentSpec and a grid of values, expanded into one
experiment per combination.

Every experiment of a sweep gets a predictable id (`<name>-<index>`) and
labels (`sweep: <name>`, and one `sweep.<key>` per grid key holding the value
as typed), so a sweep can be listed (`ListExperiments` by label), compared,
and submitted again after an interruption without creating anything twice.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf import json_format

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.core.validation import ID_PATTERN

SWEEP_LABEL = "sweep"
MAX_SWEEP_SIZE = 256

# Short names for the keys people sweep most; any other dotted path into
# ExperimentSpec works too ("algorithm.eval_every", "lora.dropout").
KEY_ALIASES = {
    "lr": "algorithm.learning_rate",
    "learning_rate": "algorithm.learning_rate",
    "seed": "seed",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "weight": "weight",
}
_ALGORITHM_FIELDS = frozenset(pb.AlgorithmSpec.DESCRIPTOR.fields_by_name)
_ID = re.compile(ID_PATTERN)


class SweepError(ValueError):
    """A sweep that cannot be expanded: bad name, key, value or grid size."""


@dataclass(frozen=True)
class Variant:
    """One experiment of a sweep."""

    experiment_id: str
    values: dict[str, str]
    """Grid key (as given) -> value as typed."""
    spec: pb.ExperimentSpec


def spec_path(key: str) -> str:
    """The dotted ExperimentSpec path a grid key names: an alias, a bare
    AlgorithmSpec field, `param.<name>` for a built-in task's parameter, or a
    dotted path as is."""
    if key in KEY_ALIASES:
        return KEY_ALIASES[key]
    if key.startswith("param."):
        return "environment.builtin.params." + key.removeprefix("param.")
    if key in _ALGORITHM_FIELDS:
        return f"algorithm.{key}"
    return key


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """["lr=1e-3,3e-3", "seed=0,1"] -> {"lr": ["1e-3", "3e-3"], "seed": ["0", "1"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not key or not values:
            raise SweepError(f"{item!r} is not KEY=VALUE[,VALUE...]")
        if key in grid:
            raise SweepError(f"grid key {key!r} is given twice")
        if len(set(values)) != len(values):
            raise SweepError(f"grid key {key!r} repeats a value: {raw}")
        grid[key] = values
    if not grid:
        raise SweepError("a sweep needs at least one grid key (KEY=V1,V2,...)")
    return grid


def expand(name: str, base: pb.ExperimentSpec, grid: Mapping[str, Sequence[str]]) -> list[Variant]:
    """One Variant per combination of the grid's values, in the order the keys
    and values were given (the last key varies fastest).

    Raises:
        SweepError: an invalid name, an unknown key, a value of the wrong type,
            or more than MAX_SWEEP_SIZE combinations.
    """
    size = 1
    for values in grid.values():
        size *= len(values)
    if size > MAX_SWEEP_SIZE:
        raise SweepError(f"the grid has {size} combinations; at most {MAX_SWEEP_SIZE}")
    suffix = len(str(size - 1)) + 1
    if not _ID.fullmatch(name) or len(name) + suffix > 63:
        raise SweepError(
            f"sweep name {name!r} must match {ID_PATTERN} and leave room for"
            f" '-<index>' ({63 - suffix} characters at most here)"
        )
    base_dict = json_format.MessageToDict(base, preserving_proto_field_name=True)
    keys = list(grid)
    variants = []
    for index, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        values = dict(zip(keys, combo, strict=True))
        spec = _with_values(base_dict, values)
        spec.labels[SWEEP_LABEL] = name
        for key, raw in values.items():
            spec.labels[f"{SWEEP_LABEL}.{key}"] = raw
        shown = " ".join(f"{k}={v}" for k, v in values.items())
        spec.display_name = f"{name} {shown}"
        variants.append(Variant(f"{name}-{index}", values, spec))
    return variants


def _with_values(base: dict[str, Any], values: Mapping[str, str]) -> pb.ExperimentSpec:
    data = copy.deepcopy(base)
    for key, raw in values.items():
        *parents, leaf = spec_path(key).split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SweepError(f"grid key {key!r}: {part!r} is not a message")
            node = child
        node[leaf] = yaml.safe_load(raw)
    try:
        return json_format.ParseDict(data, pb.ExperimentSpec())
    except json_format.ParseError as exc:
        shown = " ".join(f"{k}={v}" for k, v in values.items())
        raise SweepError(f"{shown}: {exc}") from exc


def matches(experiment: pb.Experiment, variant: Variant) -> bool:
    """Whether an existing experiment is this variant: same id, sweep and grid
    values (a sweep is known by its name and grid; the rest of the base spec is
    not compared)."""
    labels = dict(experiment.spec.labels)
    have = {k: v for k, v in labels.items() if k.startswith(f"{SWEEP_LABEL}.")}
    want = {f"{SWEEP_LABEL}.{k}": v for k, v in variant.values.items()}
    return (
        experiment.experiment_id == variant.experiment_id
        and labels.get(SWEEP_LABEL) == variant.spec.labels[SWEEP_LABEL]
        and have == want
    )
