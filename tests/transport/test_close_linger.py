"""A stopping transport lingers: what it wrote last reaches its peers, within ``close_linger_s`` and no longer."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from swarm.p2p import RpcContext, Transport
from swarm.errors import ConfigError, TransportError
from swarm.p2p.config import TransportConfig
from swarm.p2p.messages import Message
from tests.transport.conftest import Echo, MakeTransport

BLOB_BYTES = 7 * 1024 * 1024  # far more than loopback's socket buffers take at once: most stays in ours


@dataclass(frozen=True, kw_only=True)
class Blob(Message):
    data: bytes = b""


def _blob() -> bytes:
    return random.Random(15).randbytes(BLOB_BYTES)


async def _written(sender: Transport, method: str, size_bytes: int) -> None:
    """Until ``sender`` has handed ``size_bytes`` of ``method`` to its socket (written, not yet delivered)."""
    async with asyncio.timeout(10):
        while sender.traffic.snapshot().sent_by_method.get(method, 0) < size_bytes:
            await asyncio.sleep(0)


def _blob_sink(received: asyncio.Future[bytes]) -> Callable[[RpcContext, Blob], Awaitable[Echo]]:
    async def handler(ctx: RpcContext, request: Blob) -> Echo:
        if not received.done():
            received.set_result(request.data)
        return Echo(text="ok")

    return handler


async def test_stop_right_after_a_large_write_delivers_it(make_transport: MakeTransport) -> None:
    """A writes a 7 MiB request to B and stops at once: B gets it whole (before the linger, A's stop aborted the
    connection with most of it still in A's write buffer, and B got nothing)."""
    sender, receiver = await make_transport("sender", close_linger_s=10.0), await make_transport("receiver")
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    receiver.register("test.blob", Blob, _blob_sink(received))
    await sender.connect(receiver.listen_maddrs[0])
    data = _blob()
    call = asyncio.create_task(sender.call(receiver.peer_id, "test.blob", Blob(data=data), Echo, timeout_s=30))
    await _written(sender, "test.blob", BLOB_BYTES)
    started = time.monotonic()
    await sender.stop()
    stop_s = time.monotonic() - started
    with pytest.raises(TransportError):  # our own call: the stop failed it, its reply is not waited for
        await call
    async with asyncio.timeout(5):
        got = await received
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert stop_s < 5.0  # it ended when the receiver had read it all, not at the 10 s deadline


async def test_a_peer_that_stops_reading_holds_stop_for_the_linger_at_most(make_transport: MakeTransport) -> None:
    sender = await make_transport("sender", close_linger_s=0.5)
    receiver = await make_transport("receiver")
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    receiver.register("test.blob", Blob, _blob_sink(received))
    await sender.connect(receiver.listen_maddrs[0])
    for conn in receiver._table.all:  # the receiver hangs: it reads nothing more (its socket fills up)
        conn._transport.pause_reading()  # type: ignore[union-attr]
    call = asyncio.create_task(sender.call(receiver.peer_id, "test.blob", Blob(data=_blob()), Echo, timeout_s=30))
    await _written(sender, "test.blob", BLOB_BYTES)
    started = time.monotonic()
    await sender.stop()
    stop_s = time.monotonic() - started
    with pytest.raises(TransportError):
        await call
    assert 0.4 < stop_s < 0.5 + 2.0  # the linger, then an abort (generous margin for a loaded machine)
    assert not received.done()


async def test_stopping_a_mesh_does_not_wait_out_the_linger(make_transport: MakeTransport) -> None:
    """Six transports, all connected, stop one after another: each stop ends as soon as its peers closed their
    ends (a round trip on loopback), far below close_linger_s."""
    nodes = [await make_transport(f"mesh-{i}", close_linger_s=10.0) for i in range(6)]
    for node in nodes:
        node.register("test.echo", Echo, lambda ctx, request: _echo(request))
    async with asyncio.timeout(20):
        for a in nodes:
            for b in nodes:
                if a is not b:
                    await a.call(b.listen_maddrs[0], "test.echo", Echo(text="x"), Echo)
    started = time.monotonic()
    for node in nodes:
        await node.stop()
    assert time.monotonic() - started < 6.0  # 10 s or more if any stop waited out its linger


async def _echo(request: Echo) -> Echo:
    return request


def test_close_linger_is_validated() -> None:
    assert TransportConfig(close_linger_s=0).close_linger_s == 0
    with pytest.raises(ConfigError, match="close_linger_s"):
        TransportConfig(close_linger_s=-1)
    with pytest.raises(ConfigError, match="close_linger_s"):
        TransportConfig(close_linger_s=601)
