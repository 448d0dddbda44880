"""`LocalCluster` stops services in reverse start order, and services started
together (a node's trainer and rollout, every node of a mesh) stop together.

The services here are stand-ins: a `python` that ignores `-m lorafleet.<service>`,
logs when SIGTERM arrives, takes half a second to shut down, and logs its exit,
so the order of those events is what the cluster did.
"""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import pytest

from lorafleet.cluster.local import LocalCluster, ServiceSpec

SHUTDOWN_S = 0.5

STAND_IN = f"""#!{sys.executable}
import os, signal, sys, time

name, events = os.environ["STAND_IN_NAME"], os.environ["STAND_IN_EVENTS"]

def record(what):
    with open(events, "a") as fh:
        fh.write(f"{{time.monotonic()}} {{name}} {{what}}\\n")

def on_term(signum, frame):
    record("term")
    time.sleep({SHUTDOWN_S})
    record("exit")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
record("up")
while True:
    time.sleep(0.05)
"""


def _events(path: Path) -> dict[tuple[str, str], float]:
    out = {}
    for line in path.read_text().splitlines():
        at, name, what = line.split()
        out[(name, what)] = float(at)
    return out


def _wait_up(path: Path, names: list[str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and all((n, "up") in _events(path) for n in names):
            return
        time.sleep(0.05)
    raise AssertionError(f"stand-ins did not start: {path.read_text() if path.exists() else ''}")


@pytest.fixture
def cluster(tmp_path: Path) -> LocalCluster:
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return LocalCluster(tmp_path / "run", python=str(python))


def _spec(name: str, events: Path) -> ServiceSpec:
    return ServiceSpec(name, "registry", {"STAND_IN_NAME": name, "STAND_IN_EVENTS": str(events)})


def test_services_started_together_stop_together_after_their_clients(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    events = tmp_path / "events.txt"
    cluster.start(_spec("registry", events))
    cluster.start_together([_spec("trainer-0", events), _spec("rollout-0", events)])
    cluster.start(_spec("scheduler", events))
    _wait_up(events, ["registry", "trainer-0", "rollout-0", "scheduler"])

    started = time.monotonic()
    codes = cluster.stop_all()
    took = time.monotonic() - started

    assert codes == {"scheduler": 0, "trainer-0": 0, "rollout-0": 0, "registry": 0}
    at = _events(events)
    node = ("trainer-0", "rollout-0")
    # The scheduler (a client of everyone) is gone before a node hears of it...
    assert all(at[("scheduler", "exit")] < at[(n, "term")] for n in node)
    # ...both node services shut down at the same time...
    assert max(at[(n, "term")] for n in node) < min(at[(n, "exit")] for n in node)
    # ...and the registry they call goes last.
    assert all(at[(n, "exit")] < at[("registry", "term")] for n in node)
    # Three shutdowns one after another, not four (each takes SHUTDOWN_S).
    assert took < 4 * SHUTDOWN_S, took


def test_a_lone_stop_and_a_service_already_gone(cluster: LocalCluster, tmp_path: Path) -> None:
    events = tmp_path / "events.txt"
    cluster.start_together([_spec("trainer-0", events), _spec("rollout-0", events)])
    _wait_up(events, ["trainer-0", "rollout-0"])
    assert cluster.stop("rollout-0") == 0
    cluster.kill("trainer-0")
    # The group's other member was killed, this one stopped: stop_all has
    # nothing left to signal and reports both exit codes.
    codes = cluster.stop_all()
    assert codes == {"trainer-0": -9, "rollout-0": 0}
    assert ("trainer-0", "term") not in _events(events)


def test_start_together_refuses_a_name_twice(cluster: LocalCluster, tmp_path: Path) -> None:
    events = tmp_path / "events.txt"
    with pytest.raises(ValueError, match="twice"):
        cluster.start_together([_spec("rollout-0", events), _spec("rollout-0", events)])
    assert cluster.services == {}
