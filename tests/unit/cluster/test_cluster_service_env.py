"""Settings given per service kind reach every process of that kind, however it
was started (alone or together with others), and a spec's own wiring wins.

The benchmark sets its model and engine settings this way; once the node's
services started together, an override of `start` alone silently missed them.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from lorafleet.cluster.local import LocalCluster, ServiceSpec

# A stand-in for `python -m lorafleet.<service>`: writes its LORAFLEET_* settings
# to a file named after it, then waits for SIGTERM.
STAND_IN = f"""#!{sys.executable}
import json, os, signal, sys, time

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
settings = {{k: v for k, v in os.environ.items() if k.startswith("LORAFLEET_")}}
out = os.path.join(os.environ["STAND_IN_DIR"], os.environ["STAND_IN_NAME"] + ".json")
with open(out + ".tmp", "w") as fh:
    json.dump(settings, fh)
os.replace(out + ".tmp", out)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> str:
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return str(python)


def _settings_of(out: Path, name: str, timeout_s: float = 30.0) -> dict[str, str]:
    path = out / f"{name}.json"
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not start")
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_service_settings_reach_processes_started_alone_and_together(
    stand_in: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cluster = LocalCluster(
        tmp_path / "run",
        python=stand_in,
        service_env={
            "registry": {"LORAFLEET_REGISTRY_RETAIN_VERSIONS": "4"},
            "trainer": {
                "LORAFLEET_TRAINER_MODEL_PATH": "/models/qwen",
                "LORAFLEET_TRAINER_NODE_ID": "from-service-env",
            },
            "rollout": {"LORAFLEET_ROLLOUT_KV_CACHE_GIB": "0.5"},
        },
    )

    def spec(name: str, service: str, **env: str) -> ServiceSpec:
        return ServiceSpec(
            name, service, {"STAND_IN_NAME": name, "STAND_IN_DIR": str(out), **env}
        )

    try:
        cluster.start(spec("registry", "registry"))
        cluster.start_together(
            [
                spec("trainer-0", "trainer", LORAFLEET_TRAINER_NODE_ID="node-0"),
                spec("rollout-0", "rollout"),
            ]
        )
        cluster.start(spec("scheduler", "scheduler"))

        registry = _settings_of(out, "registry")
        trainer = _settings_of(out, "trainer-0")
        rollout = _settings_of(out, "rollout-0")
        scheduler = _settings_of(out, "scheduler")
    finally:
        cluster.stop_all()

    assert registry["LORAFLEET_REGISTRY_RETAIN_VERSIONS"] == "4"
    assert trainer["LORAFLEET_TRAINER_MODEL_PATH"] == "/models/qwen"
    assert rollout["LORAFLEET_ROLLOUT_KV_CACHE_GIB"] == "0.5"
    # The topology's own wiring wins over the kind's settings.
    assert trainer["LORAFLEET_TRAINER_NODE_ID"] == "node-0"
    # One kind's settings stay with that kind (what the test itself runs with aside).
    added = (set(rollout) | set(scheduler)) - set(os.environ)
    assert not [k for k in added if k.startswith(("LORAFLEET_TRAINER_", "LORAFLEET_REGISTRY_"))]
