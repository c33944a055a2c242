"""Keep-alives of one connection: PING frames on stream 0, answered with a PONG carrying the same 8 bytes.

Neither counts as activity (docs/transport.md): an idle connection that only exchanges keep-alives is still
reaped after ``idle_timeout_s`` and is the first to be evicted when the connection budget is full.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from swarm.p2p.framing import PING_PAYLOAD_BYTES, FrameType
from swarm.errors import ProtocolError, RpcTimeoutError

SendControl = Callable[[FrameType, bytes | memoryview], None]  # sends a PING or PONG frame on stream 0


class Pinger:
    """Answers the peer's PINGs and times our own."""

    def __init__(self, send: SendControl) -> None:
        self._send = send
        self._waiters: dict[bytes, asyncio.Future[None]] = {}

    def on_frame(self, ftype: FrameType, payload: bytes | memoryview) -> None:
        """A PING (answer it) or PONG (wake its ping) frame arrived."""
        if len(payload) != PING_PAYLOAD_BYTES:
            raise ProtocolError(f"{ftype.name} frame of {len(payload)} bytes; expected {PING_PAYLOAD_BYTES}")
        if ftype is FrameType.PING:
            self._send(FrameType.PONG, payload)
            return
        waiter = self._waiters.pop(bytes(payload), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def round_trip(self, timeout_s: float, closed: asyncio.Future[None], peer_short: str) -> float | None:
        """Seconds until the PONG of a new PING; None if the connection closed first (``closed`` is done)."""
        token = os.urandom(PING_PAYLOAD_BYTES)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[token] = waiter
        start = time.perf_counter()
        try:
            self._send(FrameType.PING, token)
            async with asyncio.timeout(timeout_s):
                await asyncio.wait([waiter, closed], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise RpcTimeoutError(f"{peer_short} did not answer a ping within {timeout_s:.1f}s") from None
        finally:
            self._waiters.pop(token, None)
        if not waiter.done():
            return None
        return time.perf_counter() - start
