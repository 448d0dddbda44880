"""The Kubernetes manifests (deploy/k8s, kustomize) agree with the code and with
docker-compose.yml: commands are ``service_argv``, every setting is a real one
and validates once ConfigMap, Secret and pod-name references are resolved,
ports and probes follow the image's convention, and the nodes' by-reference
pairing with the registry holds for every StatefulSet pod. Under the TLS
component (overlay cpu-tls) every service serves mutual TLS with its workload's
certificate, every address a service calls is named by the certificate of the
workload serving it, and the exec probe works against a real mutual-TLS server.

Rendering uses ``kubectl kustomize`` (kustomize built into kubectl). Without
kubectl the base is read file by file in Python (it has no patches) and the
overlay, which needs kustomize's patching, is skipped with that reason; nothing
is applied to a cluster.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    DOCKERFILES,
    K8S_BASE,
    K8S_CPU,
    K8S_CPU_TLS,
    K8S_TLS_COMPONENT,
    REPO,
    compose_raw,
    host_port,
    image_ports,
    image_uid,
    is_within,
    load_service_settings,
    service_of,
)

from lorafleet.cluster.local import service_argv
from lorafleet.cluster.topology import SCHEDULER_SERVICE

# A stand-in for the Secret the base expects the operator to create.
PLACEHOLDER_SECRET = "postgresql+asyncpg://lorafleet:secret@db.example:5432/lorafleet"
POD_IP = "10.1.2.3"  # what the kubelet puts in for status.podIP


def render(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        result = subprocess.run(
            [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
        return [d for d in yaml.safe_load_all(result.stdout) if d]
    kustomization = yaml.safe_load((path / "kustomization.yaml").read_text())
    if set(kustomization) - {"apiVersion", "kind", "labels", "resources"}:
        pytest.skip(f"kubectl is not installed: {path} needs kustomize to render its patches")
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((path / resource).read_text()) if d]
    return docs


RENDERS = {"base": K8S_BASE, "cpu": K8S_CPU, "cpu-tls": K8S_CPU_TLS}
TLS_MOUNT = "/etc/lorafleet/tls"


@pytest.fixture(scope="module", params=sorted(RENDERS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(RENDERS[request.param])


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S_BASE)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def lorafleet_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container running a lorafleet service."""
    out = []
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container["image"].split(":")[0] == "lorafleet":
                out.append((workload, container))
    return out


def pod_names(workload: dict[str, Any]) -> list[str]:
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        return [f"{name}-{i}" for i in range(workload["spec"].get("replicas", 1))]
    return [f"{name}-5d4f8b7c9-x2k4q"]  # what a Deployment's pod name looks like


def resolve_env(
    docs: list[dict[str, Any]], container: dict[str, Any], pod_name: str
) -> dict[str, str]:
    """A container's environment as the kubelet would build it: ConfigMap and
    Secret keys looked up, the pod name filled in, $(VAR) expanded in order."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            value = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"]
            )
        else:
            source = entry["valueFrom"]
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                value = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secrets = [
                    d
                    for d in docs
                    if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]
                ]
                if secrets:
                    value = base64.b64decode(secrets[0]["data"][ref["key"]]).decode()
                else:
                    assert ref["name"] == "lorafleet-database", ref
                    value = PLACEHOLDER_SECRET
            elif source["fieldRef"]["fieldPath"] == "status.podIP":
                value = POD_IP
            else:
                assert source["fieldRef"]["fieldPath"] == "metadata.name", source
                value = pod_name
        env[entry["name"]] = value
    return env


def container_settings(
    docs: list[dict[str, Any]], workload: dict[str, Any], container: dict[str, Any], pod: int = 0
) -> tuple[str, Any]:
    service = service_of(container.get("args"))
    assert service is not None, f"{container['name']}: args {container.get('args')}"
    env = resolve_env(docs, container, pod_names(workload)[pod])
    # Settings check that TLS files exist: stand-ins for the mounted Secret's.
    env = {k: v.replace(TLS_MOUNT, str(_tls_stand_ins())) for k, v in env.items()}
    return service, load_service_settings(service, env)


@functools.cache
def _tls_stand_ins() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="lorafleet-k8s-tls-"))
    for name in ("tls.crt", "tls.key", "ca.crt"):  # the keys of a cert-manager Secret
        (directory / name).write_text("")
    return directory


HEALTH_PROBE = re.compile(
    r"import sys; from lorafleet\.cluster\.local import health_status; "
    r"sys\.exit\(health_status\('127\.0\.0\.1:(\d+)'(?:, '([\w.]+)')?\) != 'SERVING'\)"
)


def probe_target(probe: dict[str, Any]) -> dict[str, Any]:
    """What a probe checks, as a grpc probe says it: the port and, if any, the
    health service; an exec probe must be the health check one-liner."""
    if "grpc" in probe:
        return probe["grpc"]
    python, flag, code = probe["exec"]["command"]
    match = HEALTH_PROBE.fullmatch(code)
    assert (python, flag) == ("python", "-c") and match, probe["exec"]
    return {"port": int(match.group(1))} | ({"service": match.group(2)} if match.group(2) else {})


# -- rendering and layout ---------------------------------------------------------------


def test_base_lists_every_manifest_in_its_folder() -> None:
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S_BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


def test_renders(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Deployment", "lorafleet-registry"),
        ("Deployment", "lorafleet-scheduler"),
        ("StatefulSet", "lorafleet-node"),
        ("Service", "lorafleet-registry"),
        ("Service", "lorafleet-scheduler"),
        ("Service", "lorafleet-node"),
        ("ConfigMap", "lorafleet-config"),
    } <= kinds


# -- commands, images, ports, probes ----------------------------------------------------


def test_containers_run_service_argv_under_the_image_entrypoint(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    services = set()
    for _workload, container in lorafleet_containers(docs):
        # args, not command: `command` would replace the image's tini entrypoint.
        assert "command" not in container, container["name"]
        service = service_of(container["args"])
        assert service is not None and container["args"] == service_argv(service)
        assert container["name"] == service
        services.add(service)
    assert services == {"registry", "scheduler", "trainer", "rollout"}


def test_images_are_the_compose_images(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    flavour, docs = rendered
    compose_images = {s["image"] for s in compose_raw()["services"].values() if "build" in s}
    assert compose_images == {"lorafleet:cpu", "lorafleet:gpu"}
    for workload in workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["image"].split(":")[0] != "lorafleet":
                continue
            assert container["image"] in compose_images, container["image"]
            if flavour.startswith("cpu"):
                assert container["image"] == "lorafleet:cpu", container["name"]
            elif workload["kind"] == "StatefulSet":
                assert container["image"] == "lorafleet:gpu", container["name"]


def test_ports_and_probes_follow_the_image_convention(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    flavour, docs = rendered
    for workload, container in lorafleet_containers(docs):
        service, settings = container_settings(docs, workload, container)
        grpc_port, metrics_port = image_ports()[service]
        assert (settings.port, settings.metrics_port) == (grpc_port, metrics_port)
        assert settings.host == "0.0.0.0" and settings.log_format == "json"
        assert {p["containerPort"] for p in container["ports"]} == {grpc_port, metrics_port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            expected = {"port": grpc_port}
            if service == "scheduler" and probe == "readinessProbe":
                # Only the replica that leads is ready (gets the Service's calls).
                expected["service"] = SCHEDULER_SERVICE
            assert probe_target(container[probe]) == expected, (container["name"], probe)
            # Kubernetes' gRPC probes cannot speak TLS: under TLS they run in the container.
            assert ("exec" in container[probe]) == flavour.endswith("tls"), container["name"]


def test_compose_uses_the_same_ports_and_commands() -> None:
    compose = compose_raw()["services"]
    for name in ("registry", "scheduler", "trainer", "rollout"):
        service = compose[name]
        assert service["command"] == service_argv(name)
        prefix = f"LORAFLEET_{name.upper()}_"
        ports = (
            int(service["environment"][f"{prefix}PORT"]),
            int(service["environment"][f"{prefix}METRICS_PORT"]),
        )
        assert ports == image_ports()[name]


def test_services_route_to_named_container_ports(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        (workload,) = [
            w
            for w in workloads(docs)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {
            p["name"]: p["containerPort"]
            for c in workload["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert ports.get(port["targetPort"]) == port["port"], (
                service["metadata"]["name"],
                port,
            )


def test_pods_run_as_the_images_non_root_user(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    uid = image_uid(DOCKERFILES["cpu"])
    for workload, container in lorafleet_containers(docs):
        pod = workload["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] == pod["fsGroup"] == uid
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_every_container_has_requests_and_a_memory_limit(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for workload in workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert "memory" in resources["limits"], container["name"]


# -- GPUs -------------------------------------------------------------------------------


def test_base_nodes_request_gpus(base: list[dict[str, Any]]) -> None:
    node = find(base, "StatefulSet", "lorafleet-node")
    for container in node["spec"]["template"]["spec"]["containers"]:
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, container["name"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    trainer = next(
        c for c in node["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer"
    )
    assert container_settings(base, node, trainer)[1].device == "cuda"


def test_cpu_overlay_requests_no_gpu() -> None:
    docs = render(K8S_CPU)
    assert "nvidia.com/gpu" not in json.dumps(docs)
    node = find(docs, "StatefulSet", "lorafleet-node")
    by_name = {c["name"]: c for c in node["spec"]["template"]["spec"]["containers"]}
    assert container_settings(docs, node, by_name["trainer"])[1].device == "cpu"
    rollout = container_settings(docs, node, by_name["rollout"])[1]
    assert rollout.dtype == "float32" and rollout.kv_cache_gib == 1


# -- the mesh fits together -------------------------------------------------------------


def test_nodes_pair_with_the_registry_by_reference(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """For every StatefulSet pod: the registry has a file root for it (pod name =
    node id), the pod's trainer and rollout use one cache directory inside it,
    and registry and node mount the same claim at the same path."""
    _, docs = rendered
    registry_deploy = find(docs, "Deployment", "lorafleet-registry")
    (registry_container,) = registry_deploy["spec"]["template"]["spec"]["containers"]
    _, registry = container_settings(docs, registry_deploy, registry_container)
    node = find(docs, "StatefulSet", "lorafleet-node")
    pods = pod_names(node)
    assert set(registry.file_roots) == set(pods)

    def claims(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in workload["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        return {
            m["mountPath"]: volumes[m["name"]]
            for m in container["volumeMounts"]
            if m["name"] in volumes
        }

    registry_claims = claims(registry_deploy, registry_container)
    for index, pod in enumerate(pods):
        root = str(registry.file_roots[pod])
        caches = set()
        for container in node["spec"]["template"]["spec"]["containers"]:
            _, settings = container_settings(docs, node, container, pod=index)
            assert settings.node_id == pod
            assert is_within(settings.adapter_cache_dir, root), (container["name"], root)
            caches.add(settings.adapter_cache_dir)
            (mount,) = [m for m in claims(node, container) if is_within(root, m)]
            assert registry_claims.get(mount) == claims(node, container)[mount], container["name"]
        assert len(caches) == 1, caches
    # The registry only reads node caches.
    cache_mounts = [m for m in registry_container["volumeMounts"] if m["name"] == "adapter-cache"]
    assert cache_mounts and all(m.get("readOnly") for m in cache_mounts)


def test_scheduler_knows_every_node_pod(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    deploy = find(docs, "Deployment", "lorafleet-scheduler")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    _, scheduler = container_settings(docs, deploy, container)
    node = find(docs, "StatefulSet", "lorafleet-node")
    headless = find(docs, "Service", node["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert [n.node_id for n in scheduler.nodes] == pod_names(node)
    registry_service = find(docs, "Service", "lorafleet-registry")
    registry_host, registry_port = host_port(scheduler.registry_address)
    assert registry_host == registry_service["metadata"]["name"]
    assert registry_port == registry_service["spec"]["ports"][0]["port"]
    containers = {c["name"]: c for c in node["spec"]["template"]["spec"]["containers"]}
    for index, entry in enumerate(scheduler.nodes):
        _, trainer = container_settings(docs, node, containers["trainer"], pod=index)
        _, rollout = container_settings(docs, node, containers["rollout"], pod=index)
        stable = f"{entry.node_id}.{node['spec']['serviceName']}"
        assert host_port(entry.rollout_address) == (stable, rollout.port)
        assert host_port(entry.trainer_address) == (stable, trainer.port)
        assert entry.slots == trainer.max_adapters == rollout.max_loras
        assert entry.max_rank == trainer.max_rank == rollout.max_lora_rank
        assert entry.base_model == (trainer.base_model_name or "tiny")
        assert trainer.registry_address == rollout.registry_address == scheduler.registry_address


def test_registry_and_scheduler_keep_state_in_postgres(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for name, key in (("registry", "registry-url"), ("scheduler", "scheduler-url")):
        deploy = find(docs, "Deployment", f"lorafleet-{name}")
        (container,) = deploy["spec"]["template"]["spec"]["containers"]
        (entry,) = [e for e in container["env"] if e["name"].endswith("_DATABASE_URL")]
        assert entry["valueFrom"]["secretKeyRef"]["key"] == key
        _, settings = container_settings(docs, deploy, container)
        assert settings.database_url.startswith("postgresql+asyncpg://")
    registry = find(docs, "Deployment", "lorafleet-registry")
    (container,) = registry["spec"]["template"]["spec"]["containers"]
    _, settings = container_settings(docs, registry, container)
    if registry["spec"]["replicas"] > 1:
        # Replicas share the durable store: a claim every replica mounts.
        durable = settings.durable_url.removeprefix("file://")
        claim_mounts = {
            m["mountPath"]
            for m in container["volumeMounts"]
            if any(
                v["name"] == m["name"] and "persistentVolumeClaim" in v
                for v in registry["spec"]["template"]["spec"]["volumes"]
            )
        }
        assert any(is_within(durable, m) for m in claim_mounts), settings.durable_url


def test_scheduler_replicas_elect_a_leader_under_their_pod_names(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    flavour, docs = rendered
    scheduler = find(docs, "Deployment", "lorafleet-scheduler")
    # A standby to take over; Recreate, since readiness is leadership and a
    # rolling update would wait forever for a new pod to become ready.
    assert scheduler["spec"]["replicas"] >= 2
    assert scheduler["spec"]["strategy"]["type"] == "Recreate"
    (container,) = scheduler["spec"]["template"]["spec"]["containers"]
    _, settings = container_settings(docs, scheduler, container)
    # Pod names are unique, so lease holder names are.
    assert settings.replica_id == pod_names(scheduler)[0]
    if flavour.endswith("tls"):
        # A name the certificate carries; the Service reaches the leader alone.
        service = find(docs, "Service", "lorafleet-scheduler")["metadata"]["name"]
        assert settings.advertised() == f"{service}:{settings.port}"
    else:
        assert settings.advertised() == f"{POD_IP}:{settings.port}"
    assert settings.lease_renew_deadline_s < settings.lease_duration_s


def test_cpu_overlay_brings_its_database() -> None:
    docs = render(K8S_CPU)
    sql = (K8S_CPU / "initdb.sql").read_text()
    assert sql == (REPO / "deploy/postgres/initdb.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", sql))
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    urls = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    postgres_service = find(docs, "Service", "lorafleet-postgres")
    for key in ("registry-url", "scheduler-url"):
        match = re.fullmatch(
            r"postgresql\+asyncpg://lorafleet:([^@]+)@([\w-]+):5432/(\w+)", urls[key]
        )
        assert match, urls[key]
        assert match.group(1) == urls["postgres-password"]
        assert match.group(2) == postgres_service["metadata"]["name"]
        assert match.group(3) in created
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvcs and all(p["spec"]["accessModes"] == ["ReadWriteOnce"] for p in pvcs)


def test_base_shares_node_caches_across_pods(base: list[dict[str, Any]]) -> None:
    # Registry pods read what node pods wrote: one claim mounted by both kinds
    # of pod on different machines must be ReadWriteMany.
    cache = find(base, "PersistentVolumeClaim", "lorafleet-adapter-cache")
    assert cache["spec"]["accessModes"] == ["ReadWriteMany"]


# -- mutual TLS (components/tls) --------------------------------------------------------


@pytest.fixture(scope="module")
def tls_docs() -> list[dict[str, Any]]:
    return render(K8S_CPU_TLS)


def certificate_of(docs: list[dict[str, Any]], workload: dict[str, Any]) -> dict[str, Any]:
    """The cert-manager Certificate whose Secret the workload mounts as `tls`."""
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    (cert,) = [
        d
        for d in docs
        if d["kind"] == "Certificate" and d["spec"]["secretName"] == volume["secret"]["secretName"]
    ]
    return cert


def names_host(dns_names: list[str], host: str) -> bool:
    """Whether a certificate with these names is valid for `host` (a wildcard
    stands for exactly one leftmost label)."""
    for name in dns_names:
        if name.startswith("*."):
            label, _, rest = host.partition(".")
            if label and rest == name[2:]:
                return True
        elif name == host:
            return True
    return False


def test_tls_component_is_a_component_the_cpu_tls_overlay_uses() -> None:
    component = yaml.safe_load((K8S_TLS_COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    overlay = yaml.safe_load((K8S_CPU_TLS / "kustomization.yaml").read_text())
    assert overlay["components"] == ["../../components/tls"]


def test_every_service_serves_mutual_tls_with_its_workloads_certificate(
    tls_docs: list[dict[str, Any]],
) -> None:
    containers = lorafleet_containers(tls_docs)
    assert {service_of(c["args"]) for _, c in containers} == {
        "registry", "scheduler", "trainer", "rollout"}
    for workload, container in containers:
        _, settings = container_settings(tls_docs, workload, container)
        server, client = settings.server_tls(), settings.client_tls()
        assert server is not None and server.client_ca_file is not None, container["name"]
        assert client is not None and client.cert_file is not None, container["name"]
        env = resolve_env(tls_docs, container, pod_names(workload)[0])
        prefix = f"LORAFLEET_{container['name'].upper()}_TLS_"
        files = {env[f"{prefix}{k}_FILE"] for k in ("CERT", "KEY", "CA")}
        assert all(f.startswith(f"{TLS_MOUNT}/") for f in files), files
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
        assert mount == {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True}
        # The probe's client: the same files, and a name the certificate carries.
        probe_files = {env[f"LORAFLEET_TLS_{k}_FILE"] for k in ("CERT", "KEY", "CA")}
        assert probe_files == files
        cert = certificate_of(tls_docs, workload)
        assert names_host(cert["spec"]["dnsNames"], env["LORAFLEET_TLS_SERVER_NAME"])
        assert set(cert["spec"]["usages"]) == {"server auth", "client auth"}
        assert cert["spec"]["issuerRef"] == {"name": "lorafleet-ca", "kind": "Issuer"}
    issuers = {d["metadata"]["name"] for d in tls_docs if d["kind"] == "Issuer"}
    assert "lorafleet-ca" in issuers


def test_certificates_name_every_address_the_mesh_calls(tls_docs: list[dict[str, Any]]) -> None:
    """Every host:port a service is configured to call is named by the
    certificate of the workload serving that port, so hostname checks pass."""
    serving: dict[int, dict[str, Any]] = {}
    calls: list[tuple[str, str]] = []
    for workload, container in lorafleet_containers(tls_docs):
        for pod in range(len(pod_names(workload))):
            _, settings = container_settings(tls_docs, workload, container, pod=pod)
            serving[settings.port] = workload
            found: list[str] = []

            def collect(value: Any, found: list[str] = found) -> None:
                if isinstance(value, dict):
                    for v in value.values():
                        collect(v)
                elif isinstance(value, list):
                    for v in value:
                        collect(v)
                elif isinstance(value, str) and re.fullmatch(r"[\w.-]+:\d+", value):
                    found.append(value)

            collect(settings.model_dump(mode="json"))
            calls += [(container["name"], address) for address in found]
    mesh_calls = [(who, a) for who, a in calls if host_port(a)[1] in serving]
    assert {host_port(a)[1] for _, a in mesh_calls} >= {50051, 50053, 50054}, calls
    for who, address in mesh_calls:
        host, port = host_port(address)
        cert = certificate_of(tls_docs, serving[port])
        assert names_host(cert["spec"]["dnsNames"], host), (who, address, cert["spec"])


async def test_the_tls_probe_passes_only_against_the_mesh_server_it_names(
    tls_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The registry's readiness probe, run as the kubelet would run it (its
    command and environment, the Secret's files made here), against a real
    server requiring mutual TLS with a certificate for the registry's name."""
    from lorafleet.core.config import ServiceSettings
    from lorafleet.core.server import create_server, start_server
    from lorafleet.core.tls_certs import write_mesh_certs

    deploy = find(tls_docs, "Deployment", "lorafleet-registry")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = resolve_env(tls_docs, container, pod_names(deploy)[0])
    certs = write_mesh_certs(tmp_path / "pki", hosts=[env["LORAFLEET_TLS_SERVER_NAME"]])
    secret = tmp_path / "secret"  # what cert-manager writes into the Secret
    secret.mkdir()
    for key, source in (("tls.crt", certs.cert_file), ("tls.key", certs.key_file),
                        ("ca.crt", certs.ca_file)):
        (secret / key).write_bytes(source.read_bytes())
    settings = ServiceSettings(
        tls_cert_file=str(secret / "tls.crt"), tls_key_file=str(secret / "tls.key"),
        tls_ca_file=str(secret / "ca.crt"), tls_require_client_cert=True)
    server, port, health = await create_server("127.0.0.1:0", [], settings=settings)
    await start_server(server, health, [])
    python, flag, code = container["readinessProbe"]["exec"]["command"]
    assert python == "python"
    code = code.replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    probe_env = {k: v.replace(TLS_MOUNT, str(secret)) for k, v in env.items()
                 if k.startswith("LORAFLEET_TLS_")}

    async def probe(**overrides: str | None) -> int:
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_TLS_")}
        run_env |= {k: v for k, v in (probe_env | overrides).items() if v is not None}
        process = await asyncio.create_subprocess_exec(sys.executable, flag, code, env=run_env)
        return await asyncio.wait_for(process.wait(), timeout=60)

    try:
        assert await probe() == 0
        # Another name than the certificate's, or no client certificate: not ready.
        assert await probe(LORAFLEET_TLS_SERVER_NAME="elsewhere") == 1
        assert await probe(LORAFLEET_TLS_CERT_FILE=None, LORAFLEET_TLS_KEY_FILE=None) == 1
    finally:
        await server.stop(grace=None)
