"""Expanding a sweep's grid into experiment specs: ids, labels, values, and
the refusals a user gets for a bad name, key or value."""

from __future__ import annotations

import pytest

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.client.scheduler import builtin_spec
from lorafleet.client.sweep import MAX_SWEEP_SIZE, SweepError, expand, matches, parse_grid


def test_every_combination_gets_an_id_labels_and_its_values():
    base = builtin_spec("count", max_steps=30, params={"max_len": 6})
    grid = parse_grid(["lr=1e-3, 3e-3", "seed=0,1", "param.max_len=4,8", "kl_coef=0.05"])
    variants = expand("grid", base, grid)
    assert len(variants) == 8
    assert [v.experiment_id for v in variants] == [f"grid-{i}" for i in range(8)]
    # The last key varies fastest, as itertools.product does.
    assert [v.values["seed"] for v in variants[:4]] == ["0", "0", "1", "1"]
    last = variants[-1]
    assert last.values == {"lr": "3e-3", "seed": "1", "param.max_len": "8", "kl_coef": "0.05"}
    assert last.spec.algorithm.learning_rate == pytest.approx(3e-3)
    assert last.spec.seed == 1
    assert last.spec.environment.builtin.params["max_len"] == 8
    assert last.spec.algorithm.kl_coef == pytest.approx(0.05)
    assert last.spec.algorithm.max_steps == 30  # the base spec's
    assert dict(last.spec.labels) == {
        "sweep": "grid",
        "sweep.lr": "3e-3",
        "sweep.seed": "1",
        "sweep.param.max_len": "8",
        "sweep.kl_coef": "0.05",
    }
    assert last.spec.display_name == "grid lr=3e-3 seed=1 param.max_len=8 kl_coef=0.05"
    assert base.algorithm.learning_rate == 0.0  # the base is not changed


def test_dotted_paths_and_aliases_reach_nested_fields():
    [variant] = expand("g", builtin_spec("sort"), parse_grid(["lora.dropout=0.1"]))
    assert variant.spec.lora.dropout == pytest.approx(0.1)
    [variant] = expand("g", builtin_spec("sort"), parse_grid(["rank=4"]))
    assert variant.spec.lora.rank == 4


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lr"], "is not KEY=VALUE"),
        (["lr="], "is not KEY=VALUE"),
        (["lr=1,2", "lr=3"], "given twice"),
        (["seed=1,1"], "repeats a value"),
        ([], "at least one grid key"),
    ],
)
def test_malformed_grids_are_refused(items, message):
    with pytest.raises(SweepError, match=message):
        parse_grid(items)


@pytest.mark.parametrize(
    ("name", "items", "message"),
    [
        ("Grid", ["lr=1e-3"], "must match"),
        ("g" * 62, ["lr=1e-3"], "leave room"),
        ("g", ["no_such_field=1"], "no_such_field"),
        ("g", ["seed=abc"], "seed"),
        ("g", ["seed=" + ",".join(str(i) for i in range(MAX_SWEEP_SIZE + 1))], "at most"),
    ],
)
def test_bad_names_keys_and_values_are_refused(name, items, message):
    with pytest.raises(SweepError, match=message):
        expand(name, builtin_spec("count"), parse_grid(items))


def test_an_existing_experiment_matches_only_its_own_variant():
    variants = expand("g", builtin_spec("count"), parse_grid(["lr=1e-3,3e-3"]))
    same = pb.Experiment(experiment_id="g-1", spec=variants[1].spec)
    assert matches(same, variants[1])
    assert not matches(same, variants[0])
    other = expand("g", builtin_spec("count"), parse_grid(["lr=1e-2,3e-3"]))
    assert not matches(pb.Experiment(experiment_id="g-0", spec=other[0].spec), variants[0])
    wider = expand("g", builtin_spec("count"), parse_grid(["lr=1e-3", "seed=0"]))
    assert not matches(pb.Experiment(experiment_id="g-0", spec=wider[0].spec), variants[0])
