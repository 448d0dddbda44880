"""The vLLM plugin that shortens the engine processes' spin (lorafleet.rollout.
vllm_plugin): registered where vLLM looks for plugins, and patching only when
asked. Checked in fresh interpreters, as vLLM's engine processes load it; the
effect on a running engine is checked in tests/integration/rollout."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

READER_SPIN = """
import zmq
from vllm.plugins import load_general_plugins
load_general_plugins()
load_general_plugins()  # vLLM calls it more than once per process
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
reader = SpinCondition(True, zmq.Context(), "ipc:///tmp/lorafleet-spin-test")
print(reader.busy_loop_s)
"""


def reader_spin_s(env_value: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "LORAFLEET_VLLM_SPIN_MS"}
    if env_value is not None:
        env["LORAFLEET_VLLM_SPIN_MS"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", READER_SPIN], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


def test_plugin_is_registered_with_vllm():
    values = [e.value for e in entry_points(group="vllm.general_plugins")]
    assert "lorafleet.rollout.vllm_plugin:register" in values


def test_spin_is_shortened_only_when_asked():
    assert reader_spin_s("5") == pytest.approx(0.005)
    assert reader_spin_s(None) == pytest.approx(1.0)  # vLLM's own default
