"""A relay's splice: two sockets joined so that bytes in on one go out on the other, untouched, within limits.

The relay never decrypts: the two ends run their own Noise session through the splice (``circuit.py``). Each
splice is bounded in bytes (both directions together) and duration, and all splices of a relay share one token
bucket of bandwidth; back-pressure is passed through (a side whose peer's socket buffer is full stops reading).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class TokenBucket:
    """A shared bandwidth budget: ``rate_bytes_per_s`` on average, bursts of up to ``burst_bytes``."""

    def __init__(
        self, rate_bytes_per_s: float, burst_bytes: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self.burst_bytes = burst_bytes
        self._clock = clock
        self._tokens = burst_bytes
        self._at = clock()

    def take(self, nbytes: int) -> float:
        """Spend ``nbytes``; the seconds the sender should wait before sending more (0 if within the budget)."""
        now = self._clock()
        self._tokens = min(self.burst_bytes, self._tokens + (now - self._at) * self.rate_bytes_per_s)
        self._at = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bytes_per_s


class _Side(asyncio.Protocol):
    """One socket of a splice."""

    def __init__(self, splice: Splice, transport: asyncio.Transport) -> None:
        self.splice = splice
        self.transport = transport
        self.other: _Side | None = None
        self.holds: set[str] = set()  # why this side does not read now: "backpressure", "bandwidth"

    def data_received(self, data: bytes) -> None:
        self.splice.forward(self, data)

    def eof_received(self) -> bool:
        self.splice.close("one end closed the circuit")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice.close(f"one end's connection was lost ({exc})" if exc else "one end closed the circuit")

    def pause_writing(self) -> None:  # our socket's buffer is full: the other side stops reading
        if self.other is not None:
            self.other.hold("backpressure")

    def resume_writing(self) -> None:
        if self.other is not None:
            self.other.release("backpressure")

    def hold(self, reason: str) -> None:
        if not self.holds and not self.transport.is_closing():
            self.transport.pause_reading()
        self.holds.add(reason)

    def release(self, reason: str) -> None:
        self.holds.discard(reason)
        if not self.holds and not self.transport.is_closing():
            self.transport.resume_reading()


class Splice:
    """Two sockets spliced by a relay (see the module docstring); ``close`` ends both."""

    def __init__(
        self,
        *,
        name: str,
        max_bytes: int,
        max_duration_s: float,
        bucket: TokenBucket,
        on_close: Callable[[Splice, str], None],
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        self.name = name  # for log lines: "<dialler host:port> -> <target short id>"
        self.max_bytes = max_bytes
        self.max_duration_s = max_duration_s
        self.bucket = bucket
        self.bytes_relayed = 0
        self.closed = False
        self.close_reason = ""
        self._on_close = on_close
        self._tap = tap  # sees every relayed buffer (the tests check that no plaintext crosses the relay)
        self._sides: list[_Side] = []
        self._timer: asyncio.TimerHandle | None = None

    def start(self, a: tuple[asyncio.Transport, bytes], b: tuple[asyncio.Transport, bytes]) -> None:
        """Join the two sockets (each with the bytes it had sent already) and start forwarding."""
        side_a, side_b = _Side(self, a[0]), _Side(self, b[0])
        side_a.other, side_b.other = side_b, side_a
        self._sides = [side_a, side_b]
        for side in self._sides:
            side.transport.set_protocol(side)
            side.transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(
            self.max_duration_s, self.close, f"relay_limit: max_circuit_duration_s={self.max_duration_s}"
        )
        for side, rest in ((side_a, a[1]), (side_b, b[1])):
            if rest:
                self.forward(side, rest)

    def forward(self, source: _Side, data: bytes) -> None:
        if self.closed or source.other is None:
            return
        self.bytes_relayed += len(data)
        if self.bytes_relayed > self.max_bytes:
            self.close(f"relay_limit: max_circuit_bytes={self.max_bytes}")
            return
        if self._tap is not None:
            self._tap(data)
        source.other.transport.write(data)
        wait_s = self.bucket.take(len(data))
        if wait_s > 0:
            source.hold("bandwidth")
            asyncio.get_running_loop().call_later(wait_s, source.release, "bandwidth")  # harmless after close

    def close(self, reason: str) -> None:
        """End the circuit: both sockets close (their pending bytes are flushed first)."""
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        if self._timer is not None:
            self._timer.cancel()
        for side in self._sides:
            side.transport.close()
        log.debug("circuit %s closed after %d bytes: %s", self.name, self.bytes_relayed, reason)
        self._on_close(self, reason)
