"""What the deployment tests share: the repository's Dockerfiles, compose file
and manifests read as data, and checks of their settings against the services'
real settings classes.

Container commands and settings come from one place each: ``service_argv`` (what
LocalCluster runs) and each service's pydantic settings class (through the same
``lorafleet.cli.serve.SERVICES`` table that ``python -m lorafleet.<service>``
uses), so a manifest that drifts from the code fails here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from lorafleet.cli.serve import SERVICES
from lorafleet.cluster.local import service_argv
from lorafleet.core.config import ServiceSettings, load_settings
from lorafleet.core.tls import ENV_PREFIX as TLS_ENV_PREFIX
from lorafleet.models.cache import CACHE_ENV

REPO = Path(__file__).resolve().parents[3]
DOCKERFILES = {"cpu": REPO / "Dockerfile", "gpu": REPO / "Dockerfile.gpu"}
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S_BASE = REPO / "deploy" / "k8s" / "base"
K8S_CPU = REPO / "deploy" / "k8s" / "overlays" / "cpu"
K8S_CPU_TLS = REPO / "deploy" / "k8s" / "overlays" / "cpu-tls"
K8S_TLS_COMPONENT = REPO / "deploy" / "k8s" / "components" / "tls"

# Variables the images read that are not service settings: the model cache, and
# the client TLS defaults of processes that are no service (an exec probe, a CLI).
NON_SETTINGS_ENV = {CACHE_ENV} | {
    f"{TLS_ENV_PREFIX}{name}" for name in ("CA_FILE", "CERT_FILE", "KEY_FILE", "SERVER_NAME")
}


def settings_class(service: str) -> type[ServiceSettings]:
    module, attribute = SERVICES[service][0].split(":")
    cls: type[ServiceSettings] = getattr(importlib.import_module(module), attribute)
    return cls


def env_prefix(service: str) -> str:
    prefix = settings_class(service).model_config.get("env_prefix")
    assert isinstance(prefix, str) and prefix, f"{service} settings have no env prefix"
    return prefix


def service_of(argv: list[str] | None) -> str | None:
    """The lorafleet service a container command runs, if it is one of ours."""
    for service in SERVICES:
        if argv == service_argv(service):
            return service
    return None


def unknown_settings(service: str, names: list[str]) -> list[str]:
    """``LORAFLEET_*`` names that are not a field of ``service``'s settings (a
    typo, or another service's variable on this container)."""
    prefix = env_prefix(service)
    fields = settings_class(service).model_fields
    bad = []
    for name in names:
        if not name.startswith("LORAFLEET_") or name in NON_SETTINGS_ENV:
            continue
        if not name.startswith(prefix) or name[len(prefix) :].lower() not in fields:
            bad.append(name)
    return bad


@contextlib.contextmanager
def _only_env(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("LORAFLEET_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def load_service_settings(service: str, env: Mapping[str, str]) -> ServiceSettings:
    """``service``'s settings as the service itself would read them from ``env``
    (and nothing else of this process's environment). Fails on names that are no
    setting of this service, and (ConfigError) on values that do not validate."""
    bad = unknown_settings(service, list(env))
    assert not bad, f"{service}: not settings of {settings_class(service).__name__}: {bad}"
    settings_env = {k: v for k, v in env.items() if k.startswith(env_prefix(service))}
    with _only_env(settings_env):
        return load_settings(settings_class(service))


# -- Dockerfiles -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines inside a
    continuation are dropped, as Docker's parser does."""
    out: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and pending):
            continue
        if not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :]


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV of the image's final stage (key=value form)."""
    env: dict[str, str] = {}
    for ins in final_stage(dockerfile_instructions(path)):
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                key, sep, value = item.partition("=")
                assert sep, f"{path}: ENV {item!r} is not key=value"
                env[key] = value
    return env


def dockerfile_args(path: Path) -> dict[str, str]:
    out = {}
    for ins in dockerfile_instructions(path):
        if ins.keyword == "ARG" and "=" in ins.args:
            key, _, value = ins.args.partition("=")
            out[key] = value
    return out


def image_ports(path: Path = DOCKERFILES["cpu"]) -> dict[str, tuple[int, int]]:
    """service -> (gRPC port, metrics port), the convention the image sets."""
    env = dockerfile_env(path)
    ports = {}
    for service in SERVICES:
        prefix = env_prefix(service)
        ports[service] = (int(env[f"{prefix}PORT"]), int(env[f"{prefix}METRICS_PORT"]))
    return ports


def image_uid(path: Path) -> int:
    users = [
        ins.args for ins in final_stage(dockerfile_instructions(path)) if ins.keyword == "USER"
    ]
    assert users, f"{path}: no USER in the final stage"
    return int(users[-1].split(":")[0])


# -- compose --------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_raw() -> dict[str, Any]:
    """docker-compose.yml with every ``${VAR:-default}`` at its default, read by
    PyYAML alone (what the Kubernetes tests compare with, without docker-compose)."""
    text = COMPOSE_FILE.read_text()
    text = _INTERPOLATION.sub(lambda m: m.group(2) or "", text).replace("$$", "$")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def is_within(path: str, root: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(root))


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
