"""Bearer tokens with roles and tenant scopes, checked by one interceptor on a real server."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker.api.auth import is_loopback
from broker.app import BrokerApp
from broker.auth.tokens import (
    Role,
    TokenStore,
    append_record,
    new_token,
    parse_ttl,
    read_records,
)
from broker.cli import main
from broker.errors import Unauthenticated
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient, BrokerError, error_from_rpc
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import BrokerFactory
from tests.helpers import eventually, eventually_async, paired_session, wait_state
from tests.ops.auth_fixtures import Tokens, token_file

A, B = "s-acme", "s-beta"
TO = "+15550100"


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return token_file(tmp_path / "tokens.json", {
        "admin": (Role.ADMIN, ("*",), None),
        "admin_acme": (Role.ADMIN, ("acme",), None),
        "worker_acme": (Role.WORKER, ("acme",), None),
        "viewer_acme": (Role.VIEWER, ("acme",), None),
        "viewer_both": (Role.VIEWER, ("acme", "beta"), 3600.0),
        "expired": (Role.WORKER, ("acme",), -1.0),
    })


@pytest.fixture
async def app(make_broker: BrokerFactory, sim: Simulator, tokens: Tokens) -> BrokerApp:
    app = await make_broker(auth_tokens_file=str(tokens.path))
    await paired_session(app, sim, A, "acme")
    await paired_session(app, sim, B, "beta")
    return app


@pytest.fixture
async def as_(app: BrokerApp, tokens: Tokens) -> AsyncIterator[Callable[[str], BrokerClient]]:
    """A client per token name ("" for none); all closed at the end."""
    clients: list[BrokerClient] = []

    def client(name: str) -> BrokerClient:
        made = BrokerClient(app.address, token=tokens[name] if name else None,
                            timeout=10, retry_attempts=1, reconnect_attempts=1)
        clients.append(made)
        return made

    yield client
    for c in clients:
        await c.close()


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> BrokerError:
    with pytest.raises(BrokerError) as caught:
        await call
    assert (caught.value.code, caught.value.reason) == (code, reason), repr(caught.value)
    return caught.value


DENIED, UNAUTH = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


async def first_events(client: BrokerClient, ids: list[str], tenant: str = "",
                       count: int = 1) -> list[str]:
    """Session ids of the first `count` events of a status stream (bounded waits)."""
    watch = client.watch_status(ids, tenant)
    try:
        return [(await asyncio.wait_for(anext(watch), 10)).session_id for _ in range(count)]
    finally:
        await watch.aclose()


async def test_on_send_stream_and_batch_a_foreign_item_fails_alone(
    app: BrokerApp, sim: Simulator, tokens: Tokens
) -> None:
    """The same answer per message as unary Send gives, and the call goes on."""
    def item(ref: int, sid: str) -> pb.SendItem:
        return pb.SendItem(ref=ref, request=pb.SendRequest(
            session_id=sid, to=TO, body=f"{sid} {ref}", idempotency_key=f"{sid}-{ref}"))

    auth = (("authorization", f"Bearer {tokens['worker_acme']}"),)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        call = stub.SendStream(iter([pb.SendBatchRequest(items=[
            item(1, A), item(2, B), item(3, "s-nope"), item(4, A)])]), metadata=auth, timeout=10)
        results = {r.ref: r async for response in call for r in response.results}
        batch = await stub.SendBatch(pb.SendBatchRequest(items=[item(5, B), item(6, A)]),
                                     metadata=auth, timeout=10)
        viewer = (("authorization", f"Bearer {tokens['viewer_acme']}"),)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SendBatch(pb.SendBatchRequest(items=[item(7, A)]), metadata=viewer,
                                 timeout=10)
    for ref in (2, 3):  # unknown and foreign look the same, as on unary Send
        assert results[ref].error.reason == pb.ErrorReason.WRONG_TENANT, results[ref]
        assert results[ref].error.code == DENIED.value[0]
    assert results[1].response.status == results[4].response.status == pb.ACKED
    assert batch.results[0].error.reason == pb.ErrorReason.WRONG_TENANT
    assert batch.results[1].response.status == pb.ACKED
    assert error_from_rpc(err.value).reason == "WRONG_ROLE"
    assert sim.record(B).accepted == []
    assert [m.body for m in sim.record(A).accepted] == [f"{A} 1", f"{A} 4", f"{A} 6"]


async def test_worker_sends_only_for_its_own_tenant(
    app: BrokerApp, sim: Simulator, as_: Callable[[str], BrokerClient]
) -> None:
    worker = as_("worker_acme")
    assert (await worker.send(A, TO, "hello")).acked
    await refused(worker.send(B, TO, "not yours"), DENIED, "WRONG_TENANT")
    # Unknown and foreign sessions look the same, so tokens cannot probe for ids.
    err = await refused(worker.send("s-nope", TO, "x"), DENIED, "WRONG_TENANT")
    assert "beta" not in err.message
    assert sim.record(B).accepted == []
    assert [m.body for m in sim.record(A).accepted] == ["hello"]
    await refused(worker.ack_inbound(B, ["i-1"]), DENIED, "WRONG_TENANT")
    receiver = worker.receive([B])
    await refused(anext(receiver), DENIED, "WRONG_TENANT")


async def test_worker_may_not_watch_or_manage(
    app: BrokerApp, as_: Callable[[str], BrokerClient]
) -> None:
    worker = as_("worker_acme")
    await refused(first_events(worker, [B]), DENIED, "WRONG_ROLE")
    await refused(first_events(worker, [A]), DENIED, "WRONG_ROLE")
    await refused(worker.health([A]), DENIED, "WRONG_ROLE")
    await refused(worker.create_session("s-new", "acme"), DENIED, "WRONG_ROLE")
    await refused(worker.stop_session(A), DENIED, "WRONG_ROLE")
    await refused(worker.delete_session(A), DENIED, "WRONG_ROLE")
    await refused(worker.logout_session(A), DENIED, "WRONG_ROLE")
    await refused(worker.restart_session(A), DENIED, "WRONG_ROLE")
    assert app.manager is not None
    assert {v.record.session_id for v in await app.manager.list_sessions()} == {A, B}


async def test_viewer_sees_only_its_tenants_and_cannot_send(
    app: BrokerApp, sim: Simulator, as_: Callable[[str], BrokerClient]
) -> None:
    viewer = as_("viewer_acme")
    await refused(viewer.send(A, TO, "x"), DENIED, "WRONG_ROLE")
    assert sim.record(A).accepted == []
    await refused(first_events(viewer, [B]), DENIED, "WRONG_TENANT")
    await refused(first_events(viewer, [], "beta"), DENIED, "WRONG_TENANT")
    await refused(viewer.get_session(B), DENIED, "WRONG_TENANT")
    await refused(viewer.get_qr(B), DENIED, "WRONG_TENANT")
    await refused(viewer.health([B]), DENIED, "WRONG_TENANT")
    await refused(viewer.list_sessions("beta"), DENIED, "WRONG_TENANT")
    await refused(viewer.stop_session(A), DENIED, "WRONG_ROLE")
    # Unfiltered listings are filtered to the token's tenants, not refused.
    assert [s.session_id for s in await viewer.list_sessions()] == [A]
    assert [h.session.session_id for h in await viewer.health()] == [A]
    assert await first_events(viewer, [A]) == [A]
    assert (await viewer.get_session(A)).tenant == "acme"

    both = as_("viewer_both")
    assert sorted(s.session_id for s in await both.list_sessions()) == [A, B]


async def test_unfiltered_status_stream_carries_only_own_tenant_events(
    app: BrokerApp, sim: Simulator, as_: Callable[[str], BrokerClient]
) -> None:
    watch = as_("viewer_acme").watch_status()
    seen: list[pb.StatusEvent] = []
    try:
        seen.append(await asyncio.wait_for(anext(watch), 10))
        # Beta's reconnect happens first, so a leak would show before acme's live event.
        assert await sim.drop(B)
        await eventually(lambda: sim.record(B).connection_attempts >= 3, 10, "beta back")
        await wait_state(app, B, State.OPEN)
        assert await sim.drop(A)
        while not seen or seen[-1].snapshot or seen[-1].session_id != A:
            seen.append(await asyncio.wait_for(anext(watch), 10))
    finally:
        await watch.aclose()
    assert {e.session_id for e in seen} == {A}
    assert seen[0].snapshot and not seen[-1].snapshot


async def test_missing_malformed_unknown_and_expired_tokens(
    app: BrokerApp, tokens: Tokens
) -> None:
    real = tokens["worker_acme"]
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    unknown, _ = new_token(Role.ADMIN, ["*"])
    cases: list[tuple[tuple[tuple[str, str], ...], str]] = [
        ((), "TOKEN_MISSING"),
        ((("authorization", "Bearer not-a-token"),), "TOKEN_MALFORMED"),
        ((("authorization", f"Basic {real}"),), "TOKEN_MALFORMED"),
        ((("authorization", real),), "TOKEN_MALFORMED"),
        ((("authorization", f"Bearer {unknown}"),), "TOKEN_INVALID"),
        ((("authorization", f"Bearer {forged}"),), "TOKEN_INVALID"),
        ((("authorization", f"Bearer {tokens['expired']}"),), "TOKEN_EXPIRED"),
    ]
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        for metadata, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListSessions(pb.ListSessionsRequest(), metadata=metadata, timeout=10)
            err = error_from_rpc(caught.value)
            assert (err.code, err.reason) == (UNAUTH, reason), repr(err)
            text = repr(err) + str(caught.value.trailing_metadata())
            for secret in (real, unknown, forged, tokens["expired"]):
                assert secret not in text and secret.split("_", 2)[2] not in text


async def test_undecodable_requests_are_authenticated_first(
    app: BrokerApp, tokens: Tokens
) -> None:
    async with grpc.aio.insecure_channel(app.address) as channel:
        send = channel.unary_unary("/broker.v1.Broker/Send", None, None)  # raw bytes
        garbage = b"\xff\xff\xff"
        for metadata, code in [
            ((), UNAUTH),
            ((("authorization", f"Bearer {tokens['viewer_acme']}"),), DENIED),
            ((("authorization", f"Bearer {tokens['worker_acme']}"),),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await send(garbage, metadata=metadata, timeout=10)
            assert caught.value.code() == code, caught.value


async def test_admin_can_do_everything(
    app: BrokerApp, sim: Simulator, as_: Callable[[str], BrokerClient]
) -> None:
    admin = as_("admin")
    assert (await admin.send(B, TO, "from admin")).acked
    assert sorted(s.session_id for s in await admin.list_sessions()) == [A, B]
    assert sorted(h.session.session_id for h in await admin.health()) == [A, B]
    assert sorted(await first_events(admin, [A, B], count=2)) == [A, B]
    created = await admin.create_session("s-gamma", "gamma")
    assert created.tenant == "gamma"
    await eventually_async(lambda: _pairing(admin, "s-gamma"), 10, "a QR code")
    assert (await admin.get_qr("s-gamma")).qr
    await admin.stop_session(B)
    await admin.restart_session(B)
    await admin.logout_session("s-gamma")
    await admin.delete_session("s-gamma")
    assert sorted(s.session_id for s in await admin.list_sessions()) == [A, B]


async def _pairing(client: BrokerClient, sid: str) -> bool:
    try:
        await client.get_qr(sid)
    except BrokerError:
        return False
    return True


async def test_tenant_scoped_admin_manages_only_its_tenant(
    app: BrokerApp, as_: Callable[[str], BrokerClient]
) -> None:
    admin = as_("admin_acme")
    await refused(admin.create_session("s-x", "beta"), DENIED, "WRONG_TENANT")
    await refused(admin.create_session("s-x"), DENIED, "WRONG_TENANT")  # tenant "default"
    await refused(admin.stop_session(B), DENIED, "WRONG_TENANT")
    assert (await admin.create_session("s-acme-2", "acme", start=False)).tenant == "acme"
    assert sorted(s.session_id for s in await admin.list_sessions()) == [A, "s-acme-2"]


async def test_health_checks_stay_open_and_reflection_needs_a_token(
    app: BrokerApp, tokens: Tokens
) -> None:
    async with grpc.aio.insecure_channel(app.address) as channel:
        check = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")

        async def list_services(metadata: tuple[tuple[str, str], ...]) -> list[str]:
            call = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
            names: list[str] = []
            async for reply in call:
                names.extend(s.name for s in reply.list_services_response.service)
            return names

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_services(())
        assert caught.value.code() == UNAUTH
        viewer = (("authorization", f"Bearer {tokens['viewer_acme']}"),)
        assert "broker.v1.Broker" in await list_services(viewer)


async def test_tokens_created_and_revoked_while_running_take_effect(
    app: BrokerApp, tokens: Tokens, as_: Callable[[str], BrokerClient]
) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["token", "create", "--role", "viewer", "--tenant", "beta",
                                  "--ttl", "1h", "--name", "dash", "--file", str(tokens.path)])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("brk_")
    assert secret not in tokens.path.read_text()
    assert oct(tokens.path.stat().st_mode & 0o777) == "0o600"

    async with BrokerClient(app.address, token=secret, retry_attempts=1) as fresh:
        async def works() -> bool:
            try:
                return [s.session_id for s in await fresh.list_sessions()] == [B]
            except BrokerError as exc:
                assert exc.reason == "TOKEN_INVALID"
                return False

        await eventually_async(works, 10, "the new token to be accepted")
        token_id = secret.split("_")[1]
        listed = runner.invoke(main, ["token", "list", "--file", str(tokens.path)])
        assert token_id in listed.output and secret not in listed.output
        revoked = runner.invoke(main, ["token", "revoke", token_id, "--file",
                                       str(tokens.path)])
        assert revoked.exit_code == 0, revoked.output

        async def refused_now() -> bool:
            try:
                await fresh.list_sessions()
            except BrokerError as exc:
                return exc.reason == "TOKEN_INVALID"
            return False

        await eventually_async(refused_now, 10, "the revoked token to be refused")


def test_token_store_unit(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    now = [1000.0]
    secret, record = new_token(Role.WORKER, ["acme", "acme"], ttl_s=60, now=now[0])
    assert record.tenants == ("acme",) and record.expires_at == 1060.0
    append_record(path, record)
    assert read_records(path) == [record]
    store = TokenStore.open(path, clock=lambda: now[0])
    assert store.authenticate(f"Bearer {secret}") == record
    assert store.authenticate(f"bearer   {secret}  ") == record
    now[0] = 1060.0
    with pytest.raises(Unauthenticated) as caught:
        store.authenticate(f"Bearer {secret}")
    assert caught.value.reason == "TOKEN_EXPIRED" and secret not in caught.value.message
    assert parse_ttl("30d") == 30 * 86400 and parse_ttl("90") == 90 and parse_ttl("2h") == 7200
    for bad in ("", "0", "-1d", "3y", "d"):
        with pytest.raises(ValueError):
            parse_ttl(bad)


def test_loopback_detection() -> None:
    for listen in ("127.0.0.1:50051", "127.0.0.2:1", "[::1]:50051", "localhost:0",
                   "unix:/tmp/broker.sock"):
        assert is_loopback(listen), listen
    for listen in ("0.0.0.0:50051", "[::]:50051", ":50051", "10.1.2.3:50051"):
        assert not is_loopback(listen), listen


async def test_auth_off_on_loopback_warns(
    make_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="broker.api.auth"):
        await make_broker()
    assert "authentication is OFF (loopback only)" in caplog.text


async def test_app_refuses_a_missing_token_file(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        await make_broker(auth_tokens_file=str(tmp_path / "nope.json"))


def test_serve_without_tokens_on_a_public_address_refuses_to_start(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BROKER_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--listen", "0.0.0.0:0", "--sim-port", "0"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0:0 without authentication" in result.stderr
    assert "--auth-tokens" in result.stderr
    assert "broker listening" not in result.stderr


async def test_people_commands_carry_the_token(app: BrokerApp, tokens: Tokens) -> None:
    """`broker sessions list --token ...`: refused without it, answered with it."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker.cli", *args, "--target", app.address],
                              capture_output=True, text=True, timeout=60)

    refused_run = await asyncio.to_thread(cli, "sessions", "list")
    assert refused_run.returncode != 0 and "UNAUTHENTICATED" in refused_run.stderr
    answered = await asyncio.to_thread(cli, "sessions", "list", "--token", tokens["admin"])
    assert answered.returncode == 0, answered.stderr
    assert A in answered.stdout


def test_every_broker_method_has_a_rule() -> None:
    """A method without one falls back to admin-only; a new RPC must say who may call it."""
    from broker.api.auth import RULES
    from broker_client.v1 import broker_pb2

    methods = set(broker_pb2.DESCRIPTOR.services_by_name["Broker"].methods_by_name)
    assert methods == set(RULES), (methods - set(RULES), set(RULES) - methods)
