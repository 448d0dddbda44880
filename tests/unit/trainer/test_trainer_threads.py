"""The trainer's default torch thread count: half the cores on CPU, where the
co-located rollout engine uses the rest; torch's own choice on an accelerator."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")

from lorafleet.trainer.app import default_torch_threads  # noqa: E402


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 1), (16, 8)])
def test_cpu_trainer_takes_half_the_cores(monkeypatch, cores, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_torch_threads("cpu") == threads


def test_accelerators_keep_torch_default():
    assert default_torch_threads("cuda") is None
    assert default_torch_threads("cuda:1") is None
