"""Service settings: one pydantic model per service, read once at the edge.

Precedence, highest first: explicit overrides (CLI flags) > environment variables
> config file (YAML or TOML) > field defaults. Unknown keys anywhere are errors
(``extra="forbid"``): a typo in a config file must stop the service, not be
silently ignored. pydantic-settings skips environment variables that name no
field, so ``load_settings`` checks those under the service's own prefix itself
(``LORAFLEET_ROLLOUT_KV_CACHE_GB`` stops the rollout service). ``__main__`` turns
the result into plain constructor arguments.
"""

from __future__ import annotations

import contextvars
import difflib
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import pydantic
from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from lorafleet.core.errors import InvalidArgument
from lorafleet.core.tls import ClientTls, ServerTls

MIB = 1024 * 1024

# settings_customise_sources is a classmethod with no per-call arguments, so the
# file chosen by load_settings reaches it through a context variable (safe under
# concurrent loads in different tasks or threads).
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "lorafleet_config_file", default=None
)

_YAML_SUFFIXES = (".yaml", ".yml")
_TOML_SUFFIXES = (".toml",)

S = TypeVar("S", bound="ServiceSettings")


class ConfigError(InvalidArgument):
    """Settings could not be loaded: bad file, unknown key, invalid value."""

    reason = "INVALID_CONFIG"


class ServiceSettings(BaseSettings):
    """Settings every lorafleet server has. Subclasses add their own fields and set
    ``model_config = SettingsConfigDict(env_prefix="LORAFLEET_<SERVICE>_")``."""

    model_config = SettingsConfigDict(
        env_prefix="LORAFLEET_",
        extra="forbid",
        validate_default=True,
    )

    host: str = Field(
        default="127.0.0.1",
        description="Interface to listen on; 0.0.0.0 (or ::) inside containers.",
    )
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="TCP port to listen on; 0 picks a free port (logged at start).",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="Log rendering: auto = console on a terminal, JSON otherwise.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Minimum log level."
    )
    grace_period_s: float = Field(
        default=10.0,
        ge=0,
        description="On SIGTERM, how long in-flight RPCs may run before being cancelled.",
    )
    max_message_bytes: int = Field(
        default=64 * MIB,
        gt=0,
        description="Largest gRPC message sent or received, in bytes.",
    )
    keepalive_time_ms: int = Field(
        default=30_000,
        gt=0,
        description="Interval between HTTP/2 keepalive pings the server sends.",
    )
    keepalive_timeout_ms: int = Field(
        default=10_000,
        gt=0,
        description="How long to wait for a keepalive ack before closing the connection.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port for the Prometheus metrics endpoint; None disables it.",
    )

    tls_cert_file: str = Field(
        default="",
        description="PEM certificate chain this server presents (and this service "
        "presents as a client where servers require one). With tls_key_file: the server "
        "listens with TLS. Empty: plaintext.",
    )
    tls_key_file: str = Field(default="", description="PEM private key of tls_cert_file.")
    tls_ca_file: str = Field(
        default="",
        description="PEM CA of the mesh. Set: this service's own calls (registry, nodes, "
        "environments) use TLS and verify servers against it.",
    )
    tls_require_client_cert: bool = Field(
        default=False,
        description="Mutual TLS: refuse callers without a certificate signed by "
        "tls_ca_file (needs tls_cert_file, tls_key_file and tls_ca_file).",
    )

    @model_validator(mode="after")
    def _tls_files_complete(self) -> ServiceSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_require_client_cert and not (self.tls_cert_file and self.tls_ca_file):
            raise ValueError(
                "tls_require_client_cert needs tls_cert_file, tls_key_file and tls_ca_file"
            )
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
            value = getattr(self, name)
            if value and not Path(value).expanduser().is_file():
                raise ValueError(f"{name} {value!r} is not a file")
        return self

    def server_tls(self) -> ServerTls | None:
        """How this server listens: TLS when a certificate is set."""
        if not self.tls_cert_file:
            return None
        return ServerTls(
            cert_file=Path(self.tls_cert_file).expanduser(),
            key_file=Path(self.tls_key_file).expanduser(),
            client_ca_file=(
                Path(self.tls_ca_file).expanduser() if self.tls_require_client_cert else None
            ),
        )

    def client_tls(self) -> ClientTls | None:
        """How this service's own calls go out: TLS when a CA is set."""
        if not self.tls_ca_file:
            return None
        return ClientTls(
            ca_file=Path(self.tls_ca_file).expanduser(),
            cert_file=Path(self.tls_cert_file).expanduser() if self.tls_cert_file else None,
            key_file=Path(self.tls_key_file).expanduser() if self.tls_key_file else None,
        )

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @property
    def address(self) -> str:
        """``host:port`` as grpc expects it (IPv6 hosts bracketed)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        path = _config_file.get()
        if path is not None:
            if path.suffix in _YAML_SUFFIXES:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            else:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        sources.append(file_secret_settings)
        return tuple(sources)


def load_settings(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build ``cls`` from defaults < ``config_file`` < env vars < ``overrides``.

    Overrides whose value is None are dropped, so CLI flags that were not given
    (argparse/click default None) do not mask the file or the environment.

    Raises:
        ConfigError: the file is missing or has an unsupported suffix, or a value
            or key is invalid (the message names each offending key and source).
    """
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.is_file():
            raise ConfigError(
                f"config file {config_file} does not exist",
                metadata={"config_file": str(config_file)},
            )
        if config_file.suffix not in _YAML_SUFFIXES + _TOML_SUFFIXES:
            raise ConfigError(
                f"config file {config_file}: unsupported suffix {config_file.suffix!r}"
                " (use .yaml, .yml or .toml)",
                metadata={"config_file": str(config_file)},
            )
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = unknown_env_settings(cls)
    if unknown:
        raise ConfigError(
            f"invalid {cls.__name__}: "
            + "; ".join(
                f"unknown setting {name!r} in environment variable {key}{did_you_mean(name, cls)}"
                for key, name in unknown.items()
            )
            + f" (known: {', '.join(sorted(cls.model_fields))})",
            metadata={"environment": ",".join(unknown)},
        )
    token = _config_file.set(config_file)
    try:
        return cls(**given)
    except pydantic.ValidationError as exc:
        raise ConfigError(
            _describe(exc, cls, config_file, given),
            metadata={"config_file": str(config_file or "")},
        ) from exc
    finally:
        _config_file.reset(token)


def unknown_env_settings(cls: type[ServiceSettings]) -> dict[str, str]:
    """Environment variables under ``cls``'s own prefix that name none of its
    settings, each with the setting name it spells. The shared ``LORAFLEET_``
    prefix is not checked: it also carries variables that are not service
    settings (``LORAFLEET_CACHE_DIR``, the CLI's ``LORAFLEET_SCHEDULER``)."""
    prefix = str(cls.model_config.get("env_prefix") or "").upper()
    if not prefix or prefix == str(ServiceSettings.model_config["env_prefix"]).upper():
        return {}
    known = {name.lower() for name in cls.model_fields}
    spelt = {
        key: key[len(prefix) :].lower()
        for key in sorted(os.environ)
        if key.upper().startswith(prefix)
    }
    return {key: name for key, name in spelt.items() if name not in known}


def did_you_mean(name: str, cls: type[ServiceSettings]) -> str:
    close = difflib.get_close_matches(name, list(cls.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(
    exc: pydantic.ValidationError,
    cls: type[ServiceSettings],
    config_file: Path | None,
    overrides: dict[str, Any],
) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "<root>"
        if error["type"] == "extra_forbidden":
            where = "overrides" if key in overrides else f"config file {config_file}"
            problems.append(
                f"unknown setting {key!r} in {where}{did_you_mean(key, cls)}"
                f" (known: {', '.join(sorted(cls.model_fields))})"
            )
        else:
            problems.append(f"{key}: {error['msg']}")
    return f"invalid {cls.__name__}: " + "; ".join(problems)
