"""`DelayedTransport`: an emulated one-way delay on a connection's writes, for tests and benchmarks of latency hiding.

`TransportConfig.emulated_delay_s` > 0 wraps each connection's socket transport in one: every write (handshake
records and frames alike), the half-close and the close reach the socket that many seconds later, in the order they
were made (one FIFO and one timer, never a timer per write: the loop does not order timers due at the same time).
On a loopback swarm where every node sets the same delay, a round trip then costs twice it. Bytes waiting out their
delay are not counted by ``get_write_buffer_size`` (they are "on the wire"), so flow control works as on a real link
of that latency; ``abort`` drops them at once. Not a link emulator: no rate limit, no loss, no jitter.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

_EOF = "eof"  # queued in place of data: the half-close
_CLOSE = "close"  # queued in place of data: the close


class DelayedTransport:
    """Wraps an ``asyncio.Transport``: writes, ``write_eof`` and ``close`` happen ``delay_s`` later, in order."""

    def __init__(self, inner: asyncio.Transport, delay_s: float) -> None:
        self._inner = inner
        self._delay_s = delay_s
        self._loop = asyncio.get_running_loop()
        self._queue: deque[tuple[float, bytes | str]] = deque()  # (due, data, or _EOF / _CLOSE)
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._push(bytes(data))  # a copy: the caller reuses its buffer at once

    def write_eof(self) -> None:
        if not self._closing:
            self._push(_EOF)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._push(_CLOSE)

    def abort(self) -> None:
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.abort()

    def is_closing(self) -> bool:
        return self._closing or self._inner.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:  # pause_reading, get_extra_info, can_write_eof, ...
        return getattr(self._inner, name)

    def _push(self, data: bytes | str) -> None:
        self._queue.append((self._loop.time() + self._delay_s, data))
        if self._timer is None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now:
            data = self._queue.popleft()[1]
            if self._inner.is_closing():
                self._queue.clear()
                return
            if isinstance(data, bytes):
                self._inner.write(data)
            elif data == _CLOSE:
                self._inner.close()
            elif self._inner.can_write_eof():
                self._inner.write_eof()
        if self._queue:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)
