"""TLS and mutual TLS on real gRPC servers: what a server with a certificate
lets in, what a client trusts, the settings that turn it on, and the
process-wide default that the CLI and scripts take from LORAFLEET_TLS_*."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from core_echo import EchoBehaviour, echo_binding

from lorafleet.client import _base as client_base
from lorafleet.client._base import AsyncServiceClient
from lorafleet.core.config import ConfigError, ServiceSettings, load_settings
from lorafleet.core.errors import Unavailable
from lorafleet.core.server import create_server, start_server
from lorafleet.core.tls import (
    ClientTls,
    TlsFileError,
    configure_client_tls,
    default_client_tls,
    reset_client_tls,
)
from lorafleet.core.tls_certs import MeshCerts, write_mesh_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> MeshCerts:
    return write_mesh_certs(tmp_path_factory.mktemp("mesh"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> MeshCerts:
    """Another CA's certificate: a stranger to the mesh."""
    return write_mesh_certs(tmp_path_factory.mktemp("stranger"), name="stranger")


@pytest.fixture(autouse=True)
def plaintext_by_default(monkeypatch):
    for name in ("CA_FILE", "CERT_FILE", "KEY_FILE", "SERVER_NAME"):
        monkeypatch.delenv(f"LORAFLEET_TLS_{name}", raising=False)
    reset_client_tls()
    yield
    reset_client_tls()


def tls_settings(certs: MeshCerts, *, mutual: bool = False) -> ServiceSettings:
    return ServiceSettings(
        tls_cert_file=str(certs.cert_file),
        tls_key_file=str(certs.key_file),
        tls_ca_file=str(certs.ca_file),
        tls_require_client_cert=mutual,
    )


@asynccontextmanager
async def serving(settings: ServiceSettings, host: str = "127.0.0.1") -> AsyncIterator[int]:
    binding = echo_binding(EchoBehaviour())
    server, port, health = await create_server(f"{host}:0", [binding], settings=settings)
    await start_server(server, health, [binding])
    try:
        yield port
    finally:
        await server.stop(grace=None)


async def health_via(target: str, tls: ClientTls | None | object) -> str:
    client = AsyncServiceClient(target, timeout_s=5, tls=tls)
    try:
        return await client.health()
    finally:
        await client.close()


async def test_a_tls_server_answers_clients_that_trust_its_ca_only(certs, other_certs):
    async with serving(tls_settings(certs)) as port:
        address = f"127.0.0.1:{port}"
        assert await health_via(address, ClientTls(ca_file=certs.ca_file)) == "SERVING"
        # The certificate names localhost too.
        assert await health_via(f"localhost:{port}", ClientTls(ca_file=certs.ca_file)) == "SERVING"
        with pytest.raises(Unavailable):  # plaintext to a TLS port
            await health_via(address, None)
        with pytest.raises(Unavailable):  # a server this client cannot verify
            await health_via(address, ClientTls(ca_file=other_certs.ca_file))
        # A name the certificate does not carry is refused, whatever the CA.
        with pytest.raises(Unavailable):
            await health_via(address, ClientTls(ca_file=certs.ca_file, server_name="elsewhere"))


async def test_mutual_tls_refuses_callers_without_a_mesh_certificate(certs, other_certs):
    async with serving(tls_settings(certs, mutual=True)) as port:
        address = f"127.0.0.1:{port}"
        member = ClientTls(
            ca_file=certs.ca_file, cert_file=certs.cert_file, key_file=certs.key_file
        )
        assert await health_via(address, member) == "SERVING"
        with pytest.raises(Unavailable):  # no client certificate
            await health_via(address, ClientTls(ca_file=certs.ca_file))
        stranger = ClientTls(
            ca_file=certs.ca_file, cert_file=other_certs.cert_file, key_file=other_certs.key_file
        )
        with pytest.raises(Unavailable):  # a certificate from another CA
            await health_via(address, stranger)


async def test_a_plaintext_server_is_not_reached_over_tls(certs):
    async with serving(ServiceSettings()) as port:
        assert await health_via(f"127.0.0.1:{port}", None) == "SERVING"
        with pytest.raises(Unavailable):
            await health_via(f"127.0.0.1:{port}", ClientTls(ca_file=certs.ca_file))


async def test_clients_take_the_process_default_from_the_environment(certs, monkeypatch):
    async with serving(tls_settings(certs, mutual=True)) as port:
        address = f"127.0.0.1:{port}"
        with pytest.raises(Unavailable):  # nothing set: plaintext
            await health_via(address, _default())
        monkeypatch.setenv("LORAFLEET_TLS_CA_FILE", str(certs.ca_file))
        monkeypatch.setenv("LORAFLEET_TLS_CERT_FILE", str(certs.cert_file))
        monkeypatch.setenv("LORAFLEET_TLS_KEY_FILE", str(certs.key_file))
        assert await health_via(address, _default()) == "SERVING"
        # A process that configured its own (a service, from its settings) wins.
        configure_client_tls(None)
        assert default_client_tls() is None
        with pytest.raises(Unavailable):
            await health_via(address, _default())


async def test_a_replica_list_verifies_the_first_host_named(certs):
    class Led(AsyncServiceClient):
        REPLICA_HEALTH_SERVICE = "lorafleet.testing.v1.EchoService"

    async with serving(tls_settings(certs)) as one, serving(tls_settings(certs)) as two:
        target = f"localhost:{one},localhost:{two}"
        client = Led(target, timeout_s=5, tls=ClientTls(ca_file=certs.ca_file))
        try:
            assert client.follows_replicas
            assert await client.health() == "SERVING"
        finally:
            await client.close()


def _swap_in(source: Path, target: Path) -> None:
    """Replace `target` in one step, as a Secret volume's update does."""
    staged = target.with_suffix(".new")
    staged.write_bytes(Path(source).read_bytes())
    staged.replace(target)


async def test_a_server_takes_rotated_certificates_without_restarting(certs, other_certs, tmp_path):
    live = MeshCerts(tmp_path / "ca.pem", tmp_path / "mesh.pem", tmp_path / "mesh-key.pem")
    for source, target in zip(
        (certs.ca_file, certs.cert_file, certs.key_file),
        (live.ca_file, live.cert_file, live.key_file),
        strict=True,
    ):
        _swap_in(source, target)
    old_ca, new_ca = ClientTls(ca_file=certs.ca_file), ClientTls(ca_file=other_certs.ca_file)
    async with serving(tls_settings(live)) as port:
        address = f"localhost:{port}"
        assert await health_via(address, old_ca) == "SERVING"

        # Half a rotation: the new certificate beside the old key. gRPC refuses
        # the pair and the server keeps presenting the old one.
        _swap_in(other_certs.cert_file, live.cert_file)
        assert await health_via(address, old_ca) == "SERVING"
        with pytest.raises(Unavailable):
            await health_via(address, new_ca)

        # The key arrives: the next connection gets the new certificate.
        _swap_in(other_certs.key_file, live.key_file)
        assert await health_via(address, new_ca) == "SERVING"
        with pytest.raises(Unavailable):
            await health_via(address, old_ca)

        # A file that vanishes mid-rotation changes nothing.
        live.cert_file.unlink()
        assert await health_via(address, new_ca) == "SERVING"


async def test_a_client_takes_its_renewed_certificate_without_restarting(
    certs, other_certs, tmp_path, monkeypatch
):
    """Mutual TLS: a client whose certificate the server refuses (another CA's,
    as an expired one would be) recovers once its files hold a valid pair: its
    next call goes out on a new channel, with no new client and no restart. A
    half-written pair (the new certificate, the old key) keeps the old channel."""
    monkeypatch.setattr(client_base, "CERTIFICATE_CHECK_INTERVAL_S", 0.0)
    live = MeshCerts(certs.ca_file, tmp_path / "tls.crt", tmp_path / "tls.key")
    _swap_in(other_certs.cert_file, live.cert_file)
    _swap_in(other_certs.key_file, live.key_file)
    tls = ClientTls(ca_file=certs.ca_file, cert_file=live.cert_file, key_file=live.key_file)
    async with serving(tls_settings(certs, mutual=True)) as port:
        client = AsyncServiceClient(f"127.0.0.1:{port}", timeout_s=2, tls=tls)
        try:
            with pytest.raises(Unavailable):
                await client.health()
            first = client.channel

            _swap_in(certs.cert_file, live.cert_file)
            with pytest.raises(Unavailable):
                await client.health()
            assert client.channel is first

            _swap_in(certs.key_file, live.key_file)
            assert await client.health() == "SERVING"
            assert client.channel is not first
            assert await client.health() == "SERVING"
        finally:
            await client.close()
    # A plaintext client, or one without a certificate, never looks at files.
    assert AsyncServiceClient("127.0.0.1:1", tls=None)._watch is None
    assert AsyncServiceClient("127.0.0.1:1", tls=ClientTls(ca_file=certs.ca_file))._watch is None


def test_settings_refuse_incomplete_or_missing_tls_files(certs, tmp_path):
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        load_settings(ServiceSettings, tls_cert_file=str(certs.cert_file))
    with pytest.raises(ConfigError, match="tls_require_client_cert needs"):
        load_settings(
            ServiceSettings,
            tls_cert_file=str(certs.cert_file),
            tls_key_file=str(certs.key_file),
            tls_require_client_cert=True,
        )
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=f"tls_ca_file '{missing}' is not a file"):
        load_settings(ServiceSettings, tls_ca_file=str(missing))
    settings = load_settings(
        ServiceSettings, tls_cert_file=str(certs.cert_file), tls_key_file=str(certs.key_file)
    )
    assert settings.server_tls() is not None and settings.server_tls().client_ca_file is None
    assert settings.client_tls() is None  # no CA: its own calls stay plaintext
    assert ServiceSettings().server_tls() is None


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(TlsFileError) as caught:
        ClientTls(ca_file=tmp_path / "gone.pem").credentials()
    assert caught.value.reason == "TLS_FILE_UNREADABLE"
    assert caught.value.metadata == {"path": str(tmp_path / "gone.pem")}


def _default() -> object:
    from lorafleet.core.channel import PROCESS_DEFAULT

    return PROCESS_DEFAULT


def test_write_mesh_certs_keeps_the_key_private(certs):
    assert Path(certs.key_file).stat().st_mode & 0o077 == 0
