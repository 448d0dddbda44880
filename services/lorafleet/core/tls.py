"""Transport security for the mesh: TLS, and mutual TLS.

Off by default (the local cluster and the demo run on loopback). A mesh that
turns it on gives every process the same three PEM files' roles:

- ``ca_file``: the CA that signed the mesh's certificates. A client verifies
  the server it calls against it; a server that requires client certificates
  verifies its callers against it.
- ``cert_file`` + ``key_file``: this process's certificate chain and key. A
  server presents them; a client presents them too where servers require it.

A server listens with TLS when its settings name a certificate
(``tls_cert_file`` and ``tls_key_file`` of every service), and refuses callers
without a certificate from ``tls_ca_file`` when ``tls_require_client_cert`` is
on. A service's own outbound calls (to the registry, the nodes, environments)
use TLS when its settings name ``tls_ca_file``; ``serve_app`` makes that the
process's default before the service builds its clients. Other processes (the
CLI, scripts, other systems' Python clients) take their default from
``LORAFLEET_TLS_CA_FILE``, ``LORAFLEET_TLS_CERT_FILE``, ``LORAFLEET_TLS_KEY_FILE``
and ``LORAFLEET_TLS_SERVER_NAME`` (the name to verify in the server's
certificate, when it differs from the host called), or from
:func:`configure_client_tls`.

A server rereads its certificate, key and client CA when their files change
(cert-manager renewing a mounted Secret, say): the next connection it accepts
uses the new files, and connections already open keep theirs. A pair that is
not yet valid (the certificate rewritten before its key) is refused by gRPC,
which keeps serving the previous one until the files change again. A client
(``lorafleet.client``) that presents a certificate looks at its files at most
once a second and, once they changed and the new certificate and key match,
makes a new channel for its next calls; calls in flight finish on the old one.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from lorafleet.core.errors import InvalidArgument

ENV_PREFIX = "LORAFLEET_TLS_"

log = structlog.get_logger(__name__)


class TlsFileError(InvalidArgument):
    reason = "TLS_FILE_UNREADABLE"


@dataclass(frozen=True)
class ClientTls:
    """How a client verifies servers (and, for mutual TLS, proves itself)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""
    """Name to verify in the server's certificate instead of the host called
    (e.g. calling 127.0.0.1 through a port-forward to a server named
    lorafleet-scheduler)."""

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument(
                "a client certificate needs both a certificate file and a key file",
                reason="TLS_CLIENT_CERT_INCOMPLETE",
            )
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca_file),
            private_key=read_pem(self.key_file) if self.key_file else None,
            certificate_chain=read_pem(self.cert_file) if self.cert_file else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    @classmethod
    def from_env(cls) -> ClientTls | None:
        """The ``LORAFLEET_TLS_*`` variables; None when no CA file is named."""
        ca = os.environ.get(f"{ENV_PREFIX}CA_FILE", "")
        if not ca:
            return None
        cert = os.environ.get(f"{ENV_PREFIX}CERT_FILE", "")
        key = os.environ.get(f"{ENV_PREFIX}KEY_FILE", "")
        return cls(
            ca_file=Path(ca),
            cert_file=Path(cert) if cert else None,
            key_file=Path(key) if key else None,
            server_name=os.environ.get(f"{ENV_PREFIX}SERVER_NAME", ""),
        )

    def as_env(self) -> dict[str, str]:
        """The same settings as ``LORAFLEET_TLS_*`` variables (for child processes)."""
        env = {f"{ENV_PREFIX}CA_FILE": str(self.ca_file)}
        if self.cert_file is not None and self.key_file is not None:
            env[f"{ENV_PREFIX}CERT_FILE"] = str(self.cert_file)
            env[f"{ENV_PREFIX}KEY_FILE"] = str(self.key_file)
        if self.server_name:
            env[f"{ENV_PREFIX}SERVER_NAME"] = self.server_name
        return env


@dataclass(frozen=True)
class ServerTls:
    """What a server presents, and whom it lets in."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    """Set: callers must present a certificate signed by this CA (mutual TLS)."""

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(read_pem(self.key_file), read_pem(self.cert_file))],
            root_certificates=read_pem(self.client_ca_file) if self.client_ca_file else None,
        )

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that follow the files: see :class:`CertificateReloader`."""
        reloader = CertificateReloader(self)
        return grpc.dynamic_ssl_server_credentials(
            reloader.initial(),
            reloader,
            require_client_authentication=self.client_ca_file is not None,
        )


class CertificateReloader:
    """gRPC's certificate fetcher for a server: called before every TLS
    handshake, it returns the files' contents when they changed since it last
    offered them, else None (keep the current ones).

    Changes are seen by the files' (mtime, size, inode), so a Secret volume's
    symlink swap counts. A file that cannot be read is logged and retried when
    the files change again; gRPC itself rejects a certificate and key that do
    not match and keeps the previous pair.
    """

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._lock = threading.Lock()  # gRPC calls from its own threads
        self._offered = file_signature(self._tls.files)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return self._tls.certificate_configuration()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        # Must not raise: an exception here would surface inside gRPC's
        # handshake path, not to anyone who could act on it.
        try:
            with self._lock:
                now = file_signature(self._tls.files)
                if now == self._offered:
                    return None
                self._offered = now
                configuration = self._tls.certificate_configuration()
        except TlsFileError as exc:
            log.warning("tls_reload_failed", error=str(exc), **exc.metadata)
            return None
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("tls_reload_failed", error=repr(exc))
            return None
        log.info("tls_certificates_reloaded", files=[str(p) for p in self._tls.files])
        return configuration


class ClientCertificateWatch:
    """Tells a client when its certificate files changed (a renewal), so that it
    makes a new channel: gRPC Python reads a channel's credentials once.

    Changes are seen as the server side sees them, by (mtime, size, inode). A
    pair that does not match yet (the certificate rewritten before its key) is
    not reported: the client keeps its channel and looks again later.
    """

    def __init__(self, tls: ClientTls) -> None:
        self._tls = tls
        self._files = tuple(p for p in (tls.cert_file, tls.key_file, tls.ca_file) if p)
        self._seen = file_signature(self._files)

    def changed(self) -> bool:
        now = file_signature(self._files)
        if now == self._seen:
            return False
        if self._tls.cert_file is not None and self._tls.key_file is not None:
            try:  # the stdlib checks that the key belongs to the certificate
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                    self._tls.cert_file, self._tls.key_file
                )
            except (OSError, ssl.SSLError) as exc:
                log.warning("tls_client_reload_waiting", error=str(exc),
                            cert_file=str(self._tls.cert_file))
                return False
        self._seen = now
        return True


def file_signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    """(mtime, size, inode) of each file, None where it cannot be read: a
    Secret volume's symlink swap changes the inode even when the rest agrees."""
    marks: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = Path(path).stat()
        except OSError:
            marks.append(None)
        else:
            marks.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(marks)


_UNSET = object()
_configured: ClientTls | None | object = _UNSET


def configure_client_tls(tls: ClientTls | None) -> None:
    """Make `tls` (None: plaintext) every channel's default in this process,
    in place of the ``LORAFLEET_TLS_*`` variables."""
    global _configured
    _configured = tls


def reset_client_tls() -> None:
    """Back to the ``LORAFLEET_TLS_*`` variables (tests)."""
    global _configured
    _configured = _UNSET


def default_client_tls() -> ClientTls | None:
    """What a channel made without an explicit choice uses."""
    if _configured is _UNSET:
        return ClientTls.from_env()
    return _configured  # type: ignore[return-value]


def read_pem(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsFileError(
            f"cannot read TLS file {path}: {exc.strerror or exc}",
            metadata={"path": str(path)},
        ) from exc
