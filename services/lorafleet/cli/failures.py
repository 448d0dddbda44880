"""How a CLI command reports a failed call, and exits 1."""

from __future__ import annotations

import sys
from typing import NoReturn

import grpc
from rich.console import Console

from lorafleet.core.errors import UNKNOWN_REASON, LorafleetError
from lorafleet.core.tls import default_client_tls


def fail(console: Console, err: LorafleetError) -> NoReturn:
    console.print(f"[red]error[/red] {err.code.name} {err.reason}: {err.message}")
    hint = connection_hint(err)
    if hint:
        console.print(f"[yellow]hint[/yellow] {hint}")
    sys.exit(1)


def connection_hint(err: LorafleetError) -> str:
    """For a call that never reached a server (UNAVAILABLE from the transport,
    not from a service): what this process tried, TLS included, since a
    plaintext client and a TLS server only ever see a closed socket."""
    if err.code != grpc.StatusCode.UNAVAILABLE or err.reason != UNKNOWN_REASON:
        return ""
    tls = default_client_tls()
    if tls is None:
        return (
            "no connection. Is the service running at that address? If it serves TLS"
            " (`lorafleet up --tls`, tls_cert_file), set LORAFLEET_TLS_CA_FILE, and for"
            " mutual TLS LORAFLEET_TLS_CERT_FILE and LORAFLEET_TLS_KEY_FILE, or pass the"
            " cluster's --cluster-file."
        )
    mine = f", client certificate {tls.cert_file}" if tls.cert_file else ", no client certificate"
    return (
        f"no connection over TLS (CA {tls.ca_file}{mine}). Is the service running and"
        " serving TLS? Its certificate must be signed by that CA and name the host called"
        " (else set LORAFLEET_TLS_SERVER_NAME); a server requiring client certificates"
        " needs LORAFLEET_TLS_CERT_FILE and LORAFLEET_TLS_KEY_FILE."
    )
