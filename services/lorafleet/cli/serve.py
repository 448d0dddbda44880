"""`lorafleet serve <service>` and `python -m lorafleet.<service>`: one entry point.

Services are imported lazily by name so that starting the registry or the
scheduler never imports torch or vLLM.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import click

from lorafleet.core.app import serve_app
from lorafleet.core.config import ConfigError, load_settings
from lorafleet.core.logging import configure_logging
from lorafleet.core.server import run_service

# service name -> (settings class, build_app), as "module:attribute"
SERVICES: dict[str, tuple[str, str]] = {
    "registry": ("lorafleet.registry.config:RegistrySettings", "lorafleet.registry.app:build_app"),
    "scheduler": (
        "lorafleet.scheduler.config:SchedulerSettings",
        "lorafleet.scheduler.app:build_app",
    ),
    "rollout": ("lorafleet.rollout.config:RolloutSettings", "lorafleet.rollout.app:build_app"),
    "trainer": ("lorafleet.trainer.config:TrainerSettings", "lorafleet.trainer.app:build_app"),
    "node": ("lorafleet.node.config:NodeSettings", "lorafleet.node.app:build_app"),
    "environment": (
        "lorafleet.environment.config:EnvironmentSettings",
        "lorafleet.environment.app:build_app",
    ),
}


def _load(path: str) -> Any:
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def run(
    service: str,
    *,
    host: str | None = None,
    port: int | None = None,
    config: Path | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
) -> None:
    settings_path, build_path = SERVICES[service]
    settings_cls = _load(settings_path)
    try:
        settings = load_settings(
            settings_cls,
            config,
            host=host,
            port=port,
            log_format=log_format,
            log_level=log_level,
        )
    except ConfigError as exc:
        click.echo(f"lorafleet serve {service}: {exc}", err=True)
        sys.exit(2)
    configure_logging(settings.log_format, settings.log_level)
    run_service(serve_app(_load(build_path), settings))


_OPTIONS = [
    click.option("--host", default=None, help="Interface to listen on (default 127.0.0.1)."),
    click.option("--port", type=int, default=None, help="Port; 0 picks a free one (logged)."),
    click.option(
        "--config",
        type=click.Path(path_type=Path),
        default=None,
        help="YAML or TOML settings file; environment variables override it.",
    ),
    click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default=None),
    click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error", "critical"]),
        default=None,
    ),
]


def _with_options(fn: Any) -> Any:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


@click.command("serve")
@click.argument("service", type=click.Choice(sorted(SERVICES)))
@_with_options
def serve_command(service: str, **options: Any) -> None:
    """Run one lorafleet service until SIGTERM/SIGINT."""
    run(service, **options)


def serve_main(service: str) -> None:
    """`python -m lorafleet.<service>`: the same flags as `lorafleet serve`."""

    @click.command(name=f"python -m lorafleet.{service}")
    @_with_options
    def command(**options: Any) -> None:
        run(service, **options)

    command()
