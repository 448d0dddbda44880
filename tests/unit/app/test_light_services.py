"""The registry, the scheduler, the environment service and the CLI start on the
light install: importing them must not pull torch, transformers, peft or vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "vllm")


@pytest.mark.parametrize(
    "module",
    [
        "lorafleet.registry.app",
        "lorafleet.scheduler.app",
        "lorafleet.environment.app",
        "lorafleet.cli.main",
        "lorafleet.client",
    ],
)
def test_module_imports_no_heavy_library(module):
    code = (
        f"import sys, json, {module}; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
