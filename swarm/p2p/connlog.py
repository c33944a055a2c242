"""Rate-limited warnings about connections: refused, evicted, or closed for bad input or a failed handshake.

Anyone can open connections, so one warning per connection lets a peer flood the log (44,000 lines in 16 s
were measured before this existed). Each transport logs at most ``FULL_LINES_PER_INTERVAL`` such warnings in
full per ``interval_s``; the rest are counted and summarized in one line when the interval ends::

    <me>: refused, evicted or closed 412 connections in the last 10 s: 300 refused (max_pending_per_ip), ...; \
sources 127.0.0.2 x300, 127.0.0.3 x112
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

FULL_LINES_PER_INTERVAL = 3
_TOP_SOURCES = 5


class ConnectionLog:
    """Warnings for one transport: the first few per interval in full, the rest as one summary per interval."""

    def __init__(
        self,
        logger: logging.Logger,
        local_short: str,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._local = local_short
        self._interval_s = interval_s
        self._clock = clock
        self._window_start_s = clock()
        self._full_lines = 0
        self._kinds: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()

    def warning(self, kind: str, source: str, fmt: str, *args: object) -> None:
        """One event: ``kind`` is its category in the summary (e.g. ``refused (max_pending_per_ip)``), ``source``
        the remote address; ``fmt % args`` is the full line, logged only while this interval has lines left."""
        self.flush_if_due()
        if self._full_lines < FULL_LINES_PER_INTERVAL:
            self._full_lines += 1
            self._log.warning(fmt, *args)
        else:
            self._kinds[kind] += 1
            self._sources[source] += 1

    def flush_if_due(self) -> None:
        """End the interval if it is over: log the summary of what was not logged in full (the reaper calls this
        every period, so a summary comes at most one period late even if no further event arrives)."""
        now = self._clock()
        if now - self._window_start_s >= self._interval_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Log the summary of the counted events (if any) and start a new interval."""
        now = self._clock() if now is None else now
        total = sum(self._kinds.values())
        if total:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self._kinds.most_common())
            sources = ", ".join(f"{host} x{n}" for host, n in self._sources.most_common(_TOP_SOURCES))
            more = len(self._sources) - _TOP_SOURCES
            self._log.warning(
                "%s: refused, evicted or closed %d connections in the last %.0f s: %s; sources %s%s",
                self._local,
                total,
                now - self._window_start_s,
                kinds,
                sources,
                f" and {more} more" if more > 0 else "",
            )
        self._window_start_s = now
        self._full_lines = 0
        self._kinds.clear()
        self._sources.clear()
