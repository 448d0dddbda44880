"""Resume (issue 4, must show): train K steps on trainer process A, SaveState,
LoadState into a fresh trainer process B, train M more steps there; the adapter
equals that of an uninterrupted K + M step run with the same data (fp32).

Both processes are started as the cluster starts them (``python -m
lorafleet.trainer --port 0``, settings from LORAFLEET_TRAINER_* variables, the
port read from the ``server_started`` log line). The uninterrupted run happens on
A, one request at a time (never fused), with the same seed and data.
"""

from __future__ import annotations

import random

import pytest
from trainer_harness import random_samples

from lorafleet.client.trainer import TrainerClient
from lorafleet.cluster.local import LocalCluster, ServiceSpec

K, M = 3, 3
LORA = {"rank": 8, "alpha": 16.0}
# Adam's moments matter at this rate: a resume with fresh moments lands far off.
OPT = {"learning_rate": 2e-2, "weight_decay": 0.01, "max_grad_norm": 1.0}
PROBE = [([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 2), ([40, 41, 42, 43, 44, 45], 1)]


def _gap(a, b) -> float:
    return max(abs(x - y) for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=True))


@pytest.fixture
def cluster(tmp_path):
    cluster = LocalCluster(tmp_path / "run")
    try:
        yield cluster
    finally:
        cluster.stop_all(timeout_s=15)


def test_resume_in_a_fresh_process_equals_uninterrupted_run(cluster, trainer_llama_dir):
    def spec(name: str, node: int) -> ServiceSpec:
        return ServiceSpec(
            name,
            "trainer",
            {
                "LORAFLEET_TRAINER_MODEL_PATH": str(trainer_llama_dir),
                "LORAFLEET_TRAINER_ADAPTER_CACHE_DIR": f"var/node-{node}/adapters",
                "LORAFLEET_TRAINER_NODE_ID": f"node-{node}",
                "LORAFLEET_TRAINER_REGISTRY_ADDRESS": "127.0.0.1:1",
                # Two trainers on two shared cores: one torch thread each.
                "LORAFLEET_TRAINER_TORCH_THREADS": "1",
            },
        )

    # Both start at once: their imports and model loads overlap.
    cluster.start(spec("trainer-a", 0))
    cluster.start(spec("trainer-b", 1))
    address_a = cluster.wait_serving("trainer-a", timeout_s=120)
    address_b = cluster.wait_serving("trainer-b", timeout_s=120)

    rng = random.Random(42)
    batches = [random_samples(rng, 4, completion=5 + i % 3) for i in range(K + M)]
    with TrainerClient(address_a) as a, TrainerClient(address_b) as b:
        for name in ("exp", "ref"):
            a.create_adapter(name, lora=LORA, optimizer=OPT, seed=11)
        for batch in batches[:K]:
            assert a.train_step("exp", batch).applied
        state = a.save_state("exp")
        assert state.step == K
        at_k = a.compute_logprobs(PROBE, adapter_id="exp")

        # The uninterrupted run, on A.
        for batch in batches:
            a.train_step("ref", batch)
        uninterrupted = a.compute_logprobs(PROBE, adapter_id="ref")

        # Resume on B, a process that has never seen the adapter.
        assert b.status().slots_used == 0
        info = b.load_state("exp", state.uri, state.sha256)
        assert info.step == K and info.lora.rank == 8
        assert info.optimizer.learning_rate == pytest.approx(2e-2)
        assert _gap(b.compute_logprobs(PROBE, adapter_id="exp"), at_k) < 1e-6
        for batch in batches[K:]:
            b.train_step("exp", batch)
        resumed = b.compute_logprobs(PROBE, adapter_id="exp")
        assert b.adapter_info("exp").step == K + M

        # Same parameters as the uninterrupted run; and the last M steps moved them.
        assert _gap(resumed, uninterrupted) < 1e-5
        assert _gap(resumed, at_k) > 1e-3
