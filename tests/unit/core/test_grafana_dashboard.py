"""The Grafana dashboard (deploy/grafana/dashboards/lorafleet.json) only queries
metrics the services really export, covers what the mesh must show, and is a
well-formed dashboard (datasource variable, unique ids, panels on the grid)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy/grafana/dashboards/lorafleet.json"

# Every module that defines metrics (importing registers them on REGISTRY).
METRICS_MODULES = (
    "lorafleet.core.metrics",
    "lorafleet.registry.metrics",
    "lorafleet.scheduler.metrics",
    "lorafleet.rollout.metrics",
    "lorafleet.trainer.metrics",
    "lorafleet.node.metrics",
)

# What the issue asks the dashboard to show, by the metric that shows it.
REQUIRED = {
    "experiment steps/s": "lorafleet_experiment_steps_total",
    "reward": "lorafleet_experiment_reward_mean",
    "accuracy": "lorafleet_experiment_accuracy",
    "queue wait": "lorafleet_experiment_queue_wait_seconds_bucket",
    "step phase split": "lorafleet_experiment_phase_seconds_sum",
    "rollout tokens/s": "lorafleet_rollout_completion_tokens_total",
    "adapter load latency": "lorafleet_rollout_adapter_load_seconds_bucket",
    "fused batch size": "lorafleet_trainer_fused_batch_adapters_sum",
    "slots used": "lorafleet_scheduler_node_slots_used",
    "gRPC errors": "grpc_server_handled_total",
}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "atan2",
}
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, label
    names, grouping labels, strings and range durations are not names)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS:
            continue
        names.add(name)
    return names


def exported_names() -> set[str]:
    for module in METRICS_MODULES:
        importlib.import_module(module)
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    out = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner, query
            out.append((f"variable {variable['name']}", inner.group(1)))
    return out


def test_extractor_finds_names_and_skips_the_rest():
    expr = (
        'histogram_quantile(0.95, sum by (experiment, le) (rate(a_b_bucket{experiment=~"$x",'
        ' phase="train"}[$__rate_interval]))) / ignoring(phase) group_left '
        'sum without (instance) (c:d_total offset 5m) and on(node) e'
    )
    assert metric_names(expr) == {"a_b_bucket", "c:d_total", "e"}


def test_every_queried_metric_is_exported(dashboard):
    exported = exported_names()
    missing = {
        (where, name)
        for where, expr in _queries(dashboard)
        for name in metric_names(expr)
        if name not in exported
    }
    assert not missing, sorted(missing)


def test_dashboard_shows_what_the_mesh_must_show(dashboard):
    used = {name for _, expr in _queries(dashboard) for name in metric_names(expr)}
    absent = {what: name for what, name in REQUIRED.items() if name not in used}
    assert not absent


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            expr = target["expr"]
            for opening, closing in ("()", "{}", "[]"):
                assert expr.count(opening) == expr.count(closing), (panel["title"], expr)
            for variable in re.findall(r"\$(\w+)", expr):
                assert variable.startswith("__") or variable in variables, variable
    # Panels never overlap.
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        for row in range(g["y"], g["y"] + g["h"]):
            for col in range(g["x"], g["x"] + g["w"]):
                assert (row, col) not in cells, panel["title"]
                cells.add((row, col))
