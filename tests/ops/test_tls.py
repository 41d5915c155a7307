"""TLS and mutual TLS on the gRPC port, with certificates made in the test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from broker.app import BrokerApp
from broker.auth.tokens import Role
from broker_client import BrokerClient, BrokerError, SyncBrokerClient
from tests.conftest import BrokerFactory
from tests.ops.auth_fixtures import CertificateAuthority, Pem, token_file


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority(directory, "ca")
        self.other_ca = CertificateAuthority(directory, "other-ca")
        self.server = self.ca.issue("broker", server=True)
        self.client = self.ca.issue("worker", server=False)
        self.stranger = self.other_ca.issue("worker", server=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


async def tls_broker(make_broker: BrokerFactory, pki: Pki, *, mutual: bool,
                     **overrides: object) -> BrokerApp:
    return await make_broker(
        tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.ca.pem.cert) if mutual else None, **overrides,
    )


async def lists(app: BrokerApp, **client_options: object) -> list[str]:
    """One ListSessions call; a failed handshake fails within the bounded timeout."""
    client = BrokerClient(app.address, timeout=5, retry_attempts=1, **client_options)  # type: ignore[arg-type]
    async with client:
        return [s.session_id for s in await client.list_sessions()]


async def fails(app: BrokerApp, **client_options: object) -> None:
    with pytest.raises(BrokerError) as caught:
        await asyncio.wait_for(lists(app, **client_options), 20)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE, repr(caught.value)


async def test_tls_connects_with_the_right_ca_only(make_broker: BrokerFactory, pki: Pki) -> None:
    app = await tls_broker(make_broker, pki, mutual=False)
    assert app.manager is not None
    await app.manager.create("s1", start=False)
    assert await lists(app, tls_ca=pki.ca.pem.cert) == ["s1"]
    await fails(app)  # plaintext client to a TLS server
    await fails(app, tls_ca=pki.other_ca.pem.cert)  # server cert from a CA it does not trust


async def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(
    make_broker: BrokerFactory, pki: Pki
) -> None:
    app = await tls_broker(make_broker, pki, mutual=True)
    ok = {"tls_ca": pki.ca.pem.cert, "tls_cert": pki.client.cert, "tls_key": pki.client.key}
    assert await lists(app, **ok) == []
    await fails(app, tls_ca=pki.ca.pem.cert)  # no client certificate
    await fails(app, tls_ca=pki.ca.pem.cert, tls_cert=pki.stranger.cert,
                tls_key=pki.stranger.key)  # client certificate from another CA
    await fails(app)  # plaintext


async def test_mutual_tls_with_tokens_and_the_sync_client(
    make_broker: BrokerFactory, pki: Pki, tmp_path: Path
) -> None:
    tokens = token_file(tmp_path / "tokens.json", {"admin": (Role.ADMIN, ("*",), None)})
    app = await tls_broker(make_broker, pki, mutual=True, auth_tokens_file=str(tokens.path))
    client = _mtls(pki.client)
    options = {"tls_ca": pki.ca.pem.cert, **client}

    def call(token: str | None) -> str:
        with SyncBrokerClient(app.address, token=token, timeout=5, retry_attempts=1,
                              **options) as sync:  # type: ignore[arg-type]
            return sync.create_session("s-tls", "acme", start=False).tenant

    assert await asyncio.to_thread(call, tokens["admin"]) == "acme"
    with pytest.raises(BrokerError) as caught:
        await asyncio.to_thread(call, None)
    assert caught.value.reason == "TOKEN_MISSING"


def _mtls(pem: Pem) -> dict[str, Path]:
    return {"tls_cert": pem.cert, "tls_key": pem.key}


async def test_half_configured_tls_fails_the_start(
    make_broker: BrokerFactory, pki: Pki, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        await make_broker(tls_cert_file=str(pki.server.cert))
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        await make_broker(tls_client_ca_file=str(pki.ca.pem.cert))
    with pytest.raises(ValueError, match="cannot read the TLS key"):
        await make_broker(tls_cert_file=str(pki.server.cert),
                          tls_key_file=str(tmp_path / "missing.key"))


def test_client_tls_options_are_checked(pki: Pki) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        BrokerClient("127.0.0.1:1", tls_cert=pki.client.cert)
    with pytest.raises(ValueError, match="either credentials"):
        BrokerClient("127.0.0.1:1", tls_ca=pki.ca.pem.cert,
                     credentials=grpc.ssl_channel_credentials())
