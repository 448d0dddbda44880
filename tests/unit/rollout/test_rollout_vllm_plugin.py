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


LOST_NOTIFICATION = """
import threading, time
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
writer = MessageQueue(n_reader=1, n_local_reader=1)
reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
handshake = threading.Thread(target=writer.wait_until_ready)
handshake.start()
reader.wait_until_ready()
handshake.join()
writer.enqueue("first")
assert reader.dequeue() == "first"
writer._spin_condition.notify = lambda: None  # from now on every notification is lost
time.sleep(0.2)  # longer than the spin: the reader parks
threading.Timer(0.05, writer.enqueue, args=("second",)).start()
started = time.monotonic()
assert reader.dequeue() == "second"
print(time.monotonic() - started)
"""


def run_with_spin(script: str, env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LORAFLEET_VLLM_SPIN_MS"}
    if env_value is not None:
        env["LORAFLEET_VLLM_SPIN_MS"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def reader_spin_s(env_value: str | None) -> float:
    return float(run_with_spin(READER_SPIN, env_value))


def test_plugin_is_registered_with_vllm():
    values = [e.value for e in entry_points(group="vllm.general_plugins")]
    assert "lorafleet.rollout.vllm_plugin:register" in values


def test_spin_is_shortened_only_when_asked():
    assert reader_spin_s("5") == pytest.approx(0.005)
    assert reader_spin_s(None) == pytest.approx(1.0)  # vLLM's own default


def test_a_parked_reader_finds_a_message_whose_notification_was_lost():
    # vLLM's own recheck would find it after 5 s; the engine stalls that long.
    waited_s = float(run_with_spin(LOST_NOTIFICATION, "5"))
    assert 0.04 < waited_s < 0.5
