"""Node events: the structured channel from a ``swarm-node start --events-file PATH`` process to its starter.

The node appends one JSON object per line to ``PATH`` (`EventWriter`): ``{"event": "listening", "maddrs": [...]}``
as soon as it listens, ``{"event": "http", "url": "http://127.0.0.1:8080/"}`` when it serves ``--http``,
``{"event": "serving", "stage": 1}`` once it serves a stage (``null``: a trainer serves
none), ``{"event": "stopped", "error": null}`` when it stops. `swarm-node local` and the tests read them with an
`EventReader` and wait on them with their own deadlines; the ``listening on`` lines on stdout are for people only.
Writing and reading both live here, so the format is defined once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from swarm.errors import ProtocolError, SwarmError
from swarm.p2p.messages import Message

MAX_EVENT_LINE_BYTES = 64 * 1024
DEFAULT_POLL_INTERVAL_S = 0.05


class NodeEventError(SwarmError):
    """The events file holds a line that is not a node event, or a node ended before the awaited event."""

    code = "node_event"


@dataclass(frozen=True, kw_only=True)
class ListeningEvent(Message):
    """The node listens on these multiaddrs (each with ``/p2p/<PeerID>``)."""

    KIND: ClassVar[str] = "listening"
    maddrs: list[str]


@dataclass(frozen=True, kw_only=True)
class HttpEvent(Message):
    """The node serves its HTTP endpoints (``--http``): the status page at ``url``, /metrics and /health beside it."""

    KIND: ClassVar[str] = "http"
    url: str


@dataclass(frozen=True, kw_only=True)
class ServingEvent(Message):
    """The node joined the run and serves ``stage`` (None: a trainer, which serves no stage)."""

    KIND: ClassVar[str] = "serving"
    stage: int | None


@dataclass(frozen=True, kw_only=True)
class ReachabilityEvent(Message):
    """What the node learnt about its reachability (`swarm.p2p.reachability`): ``status`` is unknown, public,
    private or relayed, ``maddrs`` what it announces now (dialled-back or circuit addresses)."""

    KIND: ClassVar[str] = "reachability"
    status: str
    maddrs: list[str]


@dataclass(frozen=True, kw_only=True)
class StoppedEvent(Message):
    """The node stopped; ``error`` is what made it stop, None for a clean stop."""

    KIND: ClassVar[str] = "stopped"
    error: str | None = None


NodeEvent = ListeningEvent | HttpEvent | ServingEvent | ReachabilityEvent | StoppedEvent
EVENT_TYPES: dict[str, type[NodeEvent]] = {
    cls.KIND: cls for cls in (ListeningEvent, HttpEvent, ServingEvent, ReachabilityEvent, StoppedEvent)
}
E = TypeVar("E", ListeningEvent, HttpEvent, ServingEvent, ReachabilityEvent, StoppedEvent)


def encode_event(event: NodeEvent) -> str:
    """One line of the events file (with its newline)."""
    return json.dumps({"event": event.KIND, **event.to_wire()}) + "\n"


def decode_event(line: str | bytes) -> NodeEvent:
    """The event in one line of the events file; NodeEventError if it is not one."""
    try:
        obj: Any = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise NodeEventError(f"not a JSON line: {line[:200]!r} ({e})") from None
    kind = obj.pop("event", None) if isinstance(obj, dict) else None
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise NodeEventError(f"not a node event (event must be one of {sorted(EVENT_TYPES)}): {line[:200]!r}")
    try:
        return cls.from_wire(obj)
    except ProtocolError as e:
        raise NodeEventError(f"malformed {kind!r} event: {e}") from None


class EventWriter:
    """Appends events to the file a node was given; the file is emptied when the writer is made, so a reused path
    never mixes two runs. Each event is one write of one line, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def emit(self, event: NodeEvent) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(encode_event(event))


class EventReader:
    """Reads the events a node appended to its file so far; a line still being written waits for the next poll.

    ``events`` holds every event read, in order. The file may not exist yet (the node has not started).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[NodeEvent] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[NodeEvent]:
        """Read what was appended since the last poll; returns the new events."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_EVENT_LINE_BYTES:
            raise NodeEventError(f"{self.path}: a line of over {MAX_EVENT_LINE_BYTES} bytes")
        new = [decode_event(line) for line in lines if line.strip()]
        self.events.extend(new)
        return new

    def first(self, kind: type[E]) -> E | None:
        """The first event of this kind read so far."""
        return next((e for e in self.events if isinstance(e, kind)), None)

    def _check(self, kind: type[E], alive: Callable[[], bool]) -> E | None:
        """The awaited event if it came; NodeEventError if the node ended without it."""
        running = alive()  # asked before the poll: an event written just before the node ended is still read
        self.poll()
        found = self.first(kind)
        if found is None and not running:
            raise NodeEventError(f"the node ended before reporting {kind.KIND!r} in {self.path}")
        return found

    async def wait_for(
        self, kind: type[E], *, alive: Callable[[], bool], poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    ) -> E:
        """Poll until an event of ``kind`` is read; NodeEventError once ``alive()`` is false without it. The caller
        bounds the wait (``asyncio.timeout``)."""
        while (found := self._check(kind, alive)) is None:
            await asyncio.sleep(poll_interval_s)
        return found

    def wait_for_blocking(
        self,
        kind: type[E],
        *,
        alive: Callable[[], bool],
        timeout_s: float,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> E:
        """`wait_for` for synchronous callers (scripts, tests): TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (found := self._check(kind, alive)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind.KIND!r} event in {self.path} within {timeout_s:.0f}s")
            time.sleep(poll_interval_s)
        return found
