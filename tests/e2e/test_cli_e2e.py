"""The CLI as a user drives it: `lorafleet up` in one terminal, then submit, watch,
pause, resume, cancel, `adapters ls/alias/pull` in another, and the pulled adapter
loads in peft.

Every command is a real subprocess of the installed `lorafleet` entry point; the
cluster address comes from the `runs/*/cluster.json` that `up` wrote in the
working directory, exactly as in the README. The cluster runs `up --tls`: every
connection of the mesh (scheduler replicas, registry, trainer, rollout, CLI) is
mutual TLS, and a client without the cluster's certificate gets nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.client.registry import RegistryClient
from lorafleet.client.trainer import TrainerClient
from lorafleet.core.errors import Unavailable
from lorafleet.core.tls import ClientTls

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
START_TIMEOUT_S = 240

SPEC_TOML = """\
display_name = "cli count"
base_model = "tiny"
seed = 3

[environment.builtin]
task = "count"

[lora]
rank = 4

[algorithm]
prompts_per_step = 8
group_size = 4
max_steps = 1000
"""
# max_steps is far more than the test lets the experiment run (it is paused,
# resumed and cancelled): on a fast machine 40 steps of this spec finished
# before the test's `pause` (each CLI call is a new Python process) arrived.


def run_cli(
    workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # What the developer's shell may hold must not choose the cluster or its TLS.
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LORAFLEET_SCHEDULER", "LORAFLEET_TLS_"))
    }
    base.pop("LORAFLEET_REGISTRY", None)
    env = {**base, **(env or {})}
    result = subprocess.run(
        [LORAFLEET, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=180
    )
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def cli_json(workdir: Path, *args: str):  # type: ignore[no-untyped-def]
    return json.loads(run_cli(workdir, *args, "--json").stdout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    """A directory with a running `lorafleet up`; stopped with Ctrl-C (SIGINT) at the end."""
    workdir = tmp_path_factory.mktemp("cli")
    log = (workdir / "up.log").open("w")
    # Two scheduler replicas: every command finds both in cluster.json and
    # talks to whichever leads (the last test stops the leader).
    up = subprocess.Popen(
        [LORAFLEET, "up", "--run-dir", "runs/cli", "--scheduler-replicas", "2", "--tls"],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    manifest = workdir / "runs" / "cli" / "cluster.json"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not manifest.is_file():
        assert up.poll() is None, (workdir / "up.log").read_text()
        assert time.monotonic() < deadline, (workdir / "up.log").read_text()
        time.sleep(0.5)
    yield workdir
    os.killpg(up.pid, signal.SIGINT)
    assert up.wait(timeout=90) == 0, (workdir / "up.log").read_text()
    log.close()


def manifest_of(workdir: Path) -> dict:
    return json.loads((workdir / "runs" / "cli" / "cluster.json").read_text())


def cluster_tls(entry: dict) -> ClientTls:
    files = entry["tls"]
    return ClientTls(Path(files["ca_file"]), Path(files["cert_file"]), Path(files["key_file"]))


def trainer_adapters(workdir: Path) -> list[str]:
    """Adapter ids held by every trainer of the cluster `up` started."""
    manifest = manifest_of(workdir)
    held = []
    for entry in manifest.values():
        if entry["service"] == "trainer":
            with TrainerClient(entry["address"], tls=cluster_tls(entry)) as trainer:
                held += [a.adapter_id for a in trainer.status().adapters]
    assert any(e["service"] == "trainer" for e in manifest.values()), manifest
    return held


def wait_state(workdir: Path, experiment_id: str, states: set[str], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        experiment = cli_json(workdir, "get", experiment_id)
        if experiment["state"] in states:
            return experiment
        assert time.monotonic() < deadline, experiment
        time.sleep(0.5)


def test_cli_drives_an_experiment_through_its_lifecycle(workdir: Path) -> None:
    (workdir / "spec.toml").write_text(SPEC_TOML)
    submitted = cli_json(workdir, "submit", "--spec", "spec.toml", "--id", "cli-count")
    assert submitted["experimentId"] == "cli-count"
    assert submitted["spec"]["lora"]["rank"] == 4

    # Bad input: a clear message and a non-zero exit, nothing created.
    bad = run_cli(workdir, "submit", "--task", "no-such-task", check=False)
    assert bad.returncode != 0 and "UNKNOWN_TASK" in bad.stderr + bad.stdout
    assert [e["experimentId"] for e in cli_json(workdir, "ls")] == ["cli-count"]

    wait_state(workdir, "cli-count", {"EXPERIMENT_STATE_RUNNING"}, 60)
    # Let it publish a few versions, then pause at a step boundary.
    deadline = time.monotonic() + 120
    while int(cli_json(workdir, "get", "cli-count").get("currentStep", 0)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    paused = cli_json(workdir, "pause", "cli-count")
    # Pausing takes effect at the next step boundary.
    assert paused["state"] in {"EXPERIMENT_STATE_RUNNING", "EXPERIMENT_STATE_PAUSED"}
    paused = wait_state(workdir, "cli-count", {"EXPERIMENT_STATE_PAUSED"}, 60)
    step_at_pause = int(paused["currentStep"])
    time.sleep(3)
    assert int(cli_json(workdir, "get", "cli-count")["currentStep"]) == step_at_pause

    cli_json(workdir, "resume", "cli-count")
    deadline = time.monotonic() + 120
    while int(cli_json(workdir, "get", "cli-count")["currentStep"]) <= step_at_pause:
        assert time.monotonic() < deadline
        time.sleep(0.5)

    cancelled = cli_json(workdir, "cancel", "cli-count")
    final = wait_state(workdir, "cli-count", {"EXPERIMENT_STATE_CANCELLED"}, 60)
    assert cancelled["experimentId"] == "cli-count"
    # Its slot is free again: the pause released the adapter once, and the
    # cancel released the adapter the resume had restored.
    deadline = time.monotonic() + 30
    while "cli-count" in (held := trainer_adapters(workdir)):
        assert time.monotonic() < deadline, held
        time.sleep(0.5)

    # watch replays every completed step, in order, then ends with the lifecycle.
    events = [json.loads(line) for line in run_cli(workdir, "watch", "cli-count", "--json")
              .stdout.splitlines()]
    steps = [int(e["step"]["step"]) for e in events if "step" in e]
    assert steps == list(range(1, int(final["currentStep"]) + 1))
    assert steps[-1] > step_at_pause
    # On-policy: vLLM's sampling logprobs (and so logprob_gap) only at step 1
    # and every 10th step.
    gapped = [int(e["step"]["step"]) for e in events
              if "step" in e and "logprobGap" in e["step"]["train"]]
    assert gapped == [s for s in steps if s == 1 or s % 10 == 0]
    # The human view renders the same run as a table.
    assert "cli-count" in run_cli(workdir, "watch", "cli-count").stdout


def test_a_client_without_the_clusters_certificate_gets_nothing(workdir: Path) -> None:
    registry = manifest_of(workdir)["registry"]
    address, tls = registry["address"], cluster_tls(registry)
    assert tls.ca_file.parent == workdir / "runs" / "cli" / "tls"
    with RegistryClient(address, tls=tls) as client:  # the cluster's own files
        client.list_adapters()
    for refused in (None, ClientTls(tls.ca_file)):  # plaintext; TLS without a certificate
        with RegistryClient(address, tls=refused) as client, pytest.raises(Unavailable):
            client.list_adapters()

    # The CLI given the address alone: a non-zero exit that says what to set.
    plain = run_cli(workdir, "adapters", "ls", "--registry", address, check=False)
    assert plain.returncode == 1
    assert "LORAFLEET_TLS_CA_FILE" in plain.stdout, plain.stdout
    env = {
        "LORAFLEET_TLS_CA_FILE": str(tls.ca_file),
        "LORAFLEET_TLS_CERT_FILE": str(tls.cert_file),
        "LORAFLEET_TLS_KEY_FILE": str(tls.key_file),
    }
    listed = run_cli(workdir, "adapters", "ls", "--registry", address, "--json", env=env)
    assert isinstance(json.loads(listed.stdout), list)


def test_cli_pulls_an_adapter_that_loads_in_peft(workdir: Path, tiny_model_dir: Path) -> None:
    versions = cli_json(workdir, "adapters", "versions", "cli-count")
    latest = max(int(v["version"]) for v in versions)
    assert latest >= 2
    run_cli(workdir, "adapters", "alias", f"cli-count@{latest}", "best")
    pulled = cli_json(workdir, "adapters", "pull", "cli-count@best", "--out", "pulled")
    assert pulled["version"] == latest
    path = workdir / "pulled"
    assert (path / "adapter_config.json").is_file()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, path)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            untuned = model(ids).logits
    # A trained version is not the identity: the adapter changes the logits.
    assert torch.isfinite(tuned).all()
    assert (tuned - untuned).abs().max().item() > 1e-6
    shutil.rmtree(path)


def test_cli_starts_an_experiment_from_an_aliased_version(workdir: Path) -> None:
    best = cli_json(workdir, "adapters", "get", "cli-count@best")["version"]["version"]
    child = cli_json(
        workdir, "submit", "--task", "count", "--steps", "1", "--init-from", "cli-count@best",
        "--id", "cli-child",
    )
    # Pinned to the alias's version at submit; rank 4 is the source's (the spec
    # file's), not the CLI's default of 8.
    assert child["spec"]["initFrom"] == {"adapterId": "cli-count", "version": best}
    assert child["spec"]["lora"]["rank"] == 4
    done = wait_state(workdir, "cli-child", {"EXPERIMENT_STATE_COMPLETED"}, 120)
    assert int(done["currentStep"]) == 1
    listing = run_cli(workdir, "ls").stdout
    assert f"↳ cli-count@{best}" in listing, listing

    malformed = run_cli(workdir, "submit", "--task", "count", "--init-from", "@3", check=False)
    assert malformed.returncode == 2 and "--init-from" in malformed.stderr
    missing = run_cli(
        workdir, "submit", "--task", "count", "--init-from", "cli-count@99", check=False
    )
    assert missing.returncode == 1 and "INIT_FROM_NOT_FOUND" in missing.stdout + missing.stderr
    assert "cli-child" in [e["experimentId"] for e in cli_json(workdir, "ls")]


def test_cli_sweep_submits_a_grid_once_then_follows_and_ranks_it(workdir: Path) -> None:
    # A bad value anywhere in the grid: its variant named, nothing created.
    bad = run_cli(
        workdir, "sweep", "cli-bad", "--task", "count", "--grid", "lr=1e-3,5", check=False
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "INVALID_LEARNING_RATE" in bad.stdout and "cli-bad-1 (lr=5)" in bad.stdout
    assert cli_json(workdir, "ls", "--label", "sweep=cli-bad") == []

    sweep = ("sweep", "cli-grid", "--task", "count", "--steps", "2",
             "--grid", "lr=1e-3,3e-3", "--grid", "seed=0,1")
    ids = [f"cli-grid-{i}" for i in range(4)]
    submitted = cli_json(workdir, *sweep)
    assert [e["experimentId"] for e in submitted] == ids
    assert [e["spec"]["labels"]["sweep.seed"] for e in submitted] == ["0", "1", "0", "1"]
    assert submitted[2]["spec"]["algorithm"]["learningRate"] == pytest.approx(3e-3)

    # The same command again with --watch submits nothing new, follows the
    # four to the end and ranks them.
    watched = run_cli(workdir, *sweep, "--watch")
    assert "sweep cli-grid" in watched.stdout
    assert "4 already submitted, 0 new" in watched.stderr
    listed = cli_json(workdir, "ls", "--label", "sweep=cli-grid")
    assert sorted(e["experimentId"] for e in listed) == ids
    assert all(e["state"] == "EXPERIMENT_STATE_COMPLETED" for e in listed), listed
    assert all(int(e["currentStep"]) == 2 for e in listed)
    assert cli_json(workdir, "ls", "--label", "sweep=cli-grid", "--label", "sweep.seed=1") == [
        e for e in listed if e["experimentId"] in ("cli-grid-1", "cli-grid-3")
    ]

    # Another grid under a taken name is refused; nothing is added.
    clash = run_cli(
        workdir, "sweep", "cli-grid", "--task", "count", "--grid", "lr=1e-2", check=False
    )
    assert clash.returncode == 1 and "another name" in clash.stderr, clash.stderr
    assert len(cli_json(workdir, "ls", "--label", "sweep=cli-grid")) == 4


def test_cli_follows_the_new_scheduler_leader_and_up_restarts_the_old_one(workdir: Path) -> None:
    manifest_path = workdir / "runs" / "cli" / "cluster.json"
    before = json.loads(manifest_path.read_text())
    replicas = sorted(n for n, e in before.items() if e["service"] == "scheduler")
    assert replicas == ["scheduler", "scheduler-1"], before
    (workdir / "spec.toml").write_text(SPEC_TOML)
    cli_json(workdir, "submit", "--spec", "spec.toml", "--id", "cli-failover")
    deadline = time.monotonic() + 120
    while int(cli_json(workdir, "get", "cli-failover").get("currentStep", 0)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.5)

    # The leader stops cleanly (it releases its lease): the standby leads at once.
    os.kill(before["scheduler"]["pid"], signal.SIGTERM)
    step_at_stop = int(cli_json(workdir, "get", "cli-failover")["currentStep"])
    deadline = time.monotonic() + 120
    while int(cli_json(workdir, "get", "cli-failover")["currentStep"]) <= step_at_stop + 2:
        assert time.monotonic() < deadline, (workdir / "up.log").read_text()
        time.sleep(0.5)

    # `up` started the stopped replica again, on its port, and wrote its pid. (It
    # may lead again: its clean stop released the lease, and the first to see
    # the lease free takes it; the CLI follows either way.)
    deadline = time.monotonic() + 60
    while json.loads(manifest_path.read_text())["scheduler"]["pid"] == before["scheduler"]["pid"]:
        assert time.monotonic() < deadline, (workdir / "up.log").read_text()
        time.sleep(0.5)
    assert "scheduler EXITED(0); restarting it on its port" in (workdir / "up.log").read_text()
    cancelled = cli_json(workdir, "cancel", "cli-failover")
    assert cancelled["experimentId"] == "cli-failover"
    wait_state(workdir, "cli-failover", {"EXPERIMENT_STATE_CANCELLED"}, 60)
    # Every step once, across the change of leader.
    events = [
        json.loads(line)
        for line in run_cli(workdir, "watch", "cli-failover", "--json").stdout.splitlines()
    ]
    steps = [int(e["step"]["step"]) for e in events if "step" in e]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] > step_at_stop
