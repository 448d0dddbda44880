"""Reading a service process's metrics endpoint: its port from the JSON log, its
samples over HTTP (shared by the metrics tests of this folder)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def read_metrics_port(log_path: Path, timeout_s: float = 30.0) -> int:
    """The port from the service's `metrics_started` JSON log line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"metrics_started"' in line:
                return int(json.loads(line)["port"])
        time.sleep(0.1)
    raise AssertionError(f"no metrics_started in {log_path}")


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
