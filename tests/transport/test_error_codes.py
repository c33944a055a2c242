"""Error codes across the wire: a handler's SwarmError sends its code; what a peer sends is checked at the edge."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil

import pytest

import swarm
from swarm.errors import GENERIC_CODE, ProtocolError, RecordError, RemoteError, SwarmError, is_valid_code, known_code
from swarm.p2p import RpcContext, rpc
from swarm.p2p.framing import decode_error, encode_error
from swarm.p2p.messages import packb
from tests.transport.conftest import Echo, MakeTransport


def _all_swarm_errors() -> list[type[SwarmError]]:
    for module in pkgutil.walk_packages(swarm.__path__, "swarm."):
        if module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    seen: list[type[SwarmError]] = []
    todo: list[type[SwarmError]] = [SwarmError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(c for c in cls.__subclasses__() if c.__module__.startswith("swarm.") and c not in seen)
    return seen


def test_every_swarm_error_declares_its_own_valid_code() -> None:
    classes = _all_swarm_errors()
    assert len(classes) > 25
    for cls in classes:
        assert "code" in cls.__dict__, f"{cls.__module__}.{cls.__qualname__} declares no code of its own"
        assert is_valid_code(cls.code) and known_code(cls.code) == cls.code
    codes = [cls.code for cls in classes]
    assert len(set(codes)) == len(codes), "two error classes share a code"


def test_codes_are_short_ascii_tokens() -> None:
    for bad in ("", "Stale", "stale step", "x" * 33, "stäle", "1abc", 7, None):
        assert not is_valid_code(bad) and known_code(bad) == GENERIC_CODE
    assert known_code("not_a_code_anyone_registered") == GENERIC_CODE
    with pytest.raises(TypeError):

        class Bad(SwarmError):
            code = "Not A Token"

    # a code that is not a token never leaves this node as it is
    assert decode_error(encode_error("No Such Code!", "m")) == (GENERIC_CODE, "m")
    assert RemoteError("m", code="x" * 100).code == GENERIC_CODE


async def test_a_handler_error_arrives_with_its_code(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()

    async def refuse(ctx: RpcContext, request: Echo) -> Echo:
        raise RecordError("this record is refused")

    server.register("test.refuse", Echo, refuse)
    async with asyncio.timeout(10):
        with pytest.raises(RemoteError, match="this record is refused") as caught:
            await client.call(server.listen_maddrs[0], "test.refuse", Echo(), Echo)
        assert caught.value.code == "record"
        with pytest.raises(RemoteError) as caught:
            await client.call(server.listen_maddrs[0], "test.nope", Echo(), Echo)
        assert caught.value.code == "unknown_method"


@pytest.mark.parametrize(
    ("sent_code", "outcome"),
    [
        ("Stale Step!", GENERIC_CODE),  # not a token
        ("z" * 5000, GENERIC_CODE),  # far too long
        ("quota_exceeded", GENERIC_CODE),  # a token, but nobody here knows it
        (17, ProtocolError),  # not a string: the reply is malformed
    ],
)
async def test_malformed_codes_from_a_peer_are_mapped_or_dropped_and_both_keep_serving(
    make_transport: MakeTransport,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    sent_code: object,
    outcome: object,
) -> None:
    server, client = await make_transport(), await make_transport()

    async def fail(ctx: RpcContext, request: Echo) -> Echo:
        raise RecordError("boom")

    async def echo(ctx: RpcContext, request: Echo) -> Echo:
        return Echo(number=request.number + 1)

    server.register("test.fail", Echo, fail)
    server.register("test.echo", Echo, echo)
    # the peer misbehaves: its error replies carry ``sent_code`` as they are
    monkeypatch.setattr(rpc, "encode_error", lambda code, message: packb({"code": sent_code, "message": message}))
    addr = server.listen_maddrs[0]
    async with asyncio.timeout(10):
        if outcome is ProtocolError:
            with pytest.raises(ProtocolError, match="error frame"):
                await client.call(addr, "test.fail", Echo(), Echo)
        else:
            with pytest.raises(RemoteError) as caught:
                await client.call(addr, "test.fail", Echo(), Echo)
            assert caught.value.code == outcome
            assert "malformed or unknown error code" in caplog.text
        assert (await client.call(addr, "test.echo", Echo(number=1), Echo)).number == 2  # one connection, still fine
    assert len(client._table.all) == 1
