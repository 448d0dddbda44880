"""Fixtures of the scheduler's unit tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lorafleet.client.scheduler import builtin_spec
from lorafleet.scheduler.nodes import NodeHandle
from lorafleet.scheduler.runner import ExperimentRunner, RunnerSettings
from lorafleet.scheduler.types import ExperimentRecord, NodeRecord


@pytest.fixture
async def offline_runner():
    """A factory of runners whose node points nowhere: a test replaces
    `runner.node.trainer.call` to see and answer the trainer calls."""
    nodes: list[NodeHandle] = []

    def make(experiment_id: str, *, latest_version: int, fencing_token: int) -> ExperimentRunner:
        record = ExperimentRecord(
            experiment_id,
            builtin_spec("add"),
            adapter_id=experiment_id,
            latest_version=latest_version,
        )
        node = NodeHandle.connect(
            NodeRecord("n0", "127.0.0.1:1", "127.0.0.1:1", "tiny", slots=1, max_rank=8),
            budget_tokens=65536,
        )
        nodes.append(node)
        return ExperimentRunner(
            record,
            node,
            node.trainer,
            store=None,  # type: ignore[arg-type]
            env=None,  # type: ignore[arg-type]
            settings=RunnerSettings(5.0, 5.0, 1, fencing_token=fencing_token),
            on_step=lambda m: None,
            should_stop=lambda: False,
        )

    factory: Callable[..., ExperimentRunner] = make
    yield factory
    for node in nodes:
        await node.close()
