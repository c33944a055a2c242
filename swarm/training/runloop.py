"""`RunLoop`: what the trainer and the validator roles share: their loops in one TaskGroup, the watch that ends
it, the view loop, reading the run's records, and writing the node's summary when the role ends.

A role calls `run_loops(stop_event, loops)` once it has joined. The TaskGroup runs the watch, the view loop and the
role's own ``loops`` until ``stop_event`` is set (the role's `_stopping` runs, then the group ends) or the role's
`_is_over` says so; then the summary is written, whatever ended the group.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

from swarm.errors import AddressError, SwarmError
from swarm.p2p import Transport
from swarm.p2p.maddr import parse_maddr
from swarm.dht.keys import peers_key, progress_key
from swarm.training.summary import NodeSummary
from swarm.training.view import SwarmView

log = logging.getLogger(__name__)

PROTECTED_TAG = "training"  # the tag under which a role protects its run's peers' connections from eviction


class _Done(Exception):
    """Internal: ends the role's TaskGroup (stop requested, or the role finished)."""


class RunLoop(ABC):
    """The loop plumbing of a role; subclasses say when they are done, how they see the run, what they report."""

    def __init__(self, *, poll_interval_s: float, summary_path: Path | None) -> None:
        self.poll_interval_s = poll_interval_s
        self.summary_path = summary_path

    async def run_loops(self, stop_event: asyncio.Event, loops: Iterable[Coroutine[Any, Any, None]]) -> None:
        """Run the watch, the view loop and ``loops`` until the watch ends them; then write the summary."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(stop_event))
                tg.create_task(self._view_loop())
                for loop in loops:
                    tg.create_task(loop)
        except* _Done:
            pass
        finally:
            self.write_summary()

    async def _watch(self, stop_event: asyncio.Event) -> None:
        while not stop_event.is_set():
            if await self._is_over(stop_event):
                raise _Done()
            try:
                async with asyncio.timeout(self.poll_interval_s):
                    await stop_event.wait()
            except TimeoutError:
                pass
        await self._stopping()
        raise _Done()

    async def _view_loop(self) -> None:
        while True:
            fresh = await self.refresh_view()
            await self._after_view(fresh)
            await self._next_view()

    @abstractmethod
    async def _is_over(self, stop_event: asyncio.Event) -> bool:
        """Whether the role is done (checked every ``poll_interval_s``); may finish its work before saying so."""

    async def _stopping(self) -> None:
        """Called once when ``stop_event`` ends the role."""
        return

    @abstractmethod
    async def refresh_view(self) -> bool:
        """Re-read the run's records; False if they could not be read (the view is left as it was)."""

    async def _after_view(self, fresh: bool) -> None:
        """Called after each `refresh_view` of the view loop (``fresh``: its result)."""
        return

    async def _next_view(self) -> None:
        """Wait until the view loop's next refresh."""
        await asyncio.sleep(self.poll_interval_s)

    @abstractmethod
    def summary(self) -> NodeSummary:
        """What the node reports when the role ends (the launcher aggregates it)."""

    def write_summary(self) -> None:
        """Write `summary` to ``summary_path`` (atomically, `NodeSummary.write`; nothing without a path)."""
        if self.summary_path is not None:
            self.summary().write(self.summary_path)


def run_key_prefixes(run_id: str, run_name: str) -> list[str]:
    """The DHT key prefixes of a run's records (``{run}/...`` and ``runs/{name}/...``), which a role's node keeps
    over all others when its storage is over budget (`DHT.prefer_prefixes`)."""
    return [f"{run_id}/", f"runs/{run_name}/"]


def unprotect_run_peers(transport: Transport) -> None:
    """Drop the protection `read_view` gave the run's peers (the role stops)."""
    transport.set_protected(PROTECTED_TAG, ())


async def read_view(dht: Any, transport: Transport, *, run_id: str, timeout_s: float) -> SwarmView | None:
    """The run's peer and progress records as a `SwarmView` (None, with a warning, if the DHT does not answer within
    ``timeout_s``), and the peers' addresses learnt by ``transport``. Every peer of the view (this node aside) becomes
    exactly the set ``transport`` protects under `PROTECTED_TAG`: its connection keeps a reserved slot and is never
    evicted for a newcomer (the stage's peers, the stages this node calls, the drivers it serves)."""
    me = transport.peer_id
    try:
        async with asyncio.timeout(timeout_s):  # both keys at once: one lookup's round trips, not two
            peers, progress = await asyncio.gather(
                dht.get(peers_key(run_id), latest=True), dht.get(progress_key(run_id), latest=True)
            )
    except (SwarmError, TimeoutError, OSError) as e:
        log.warning("%s: could not read the swarm's records: %s", me.short(), e)
        return None
    view = SwarmView.parse(peers, progress)
    for peer, record in view.peers.items():
        if peer == me:
            continue
        try:
            transport.add_addresses(peer, [parse_maddr(m) for m in record.maddrs])
        except AddressError as e:
            log.warning("%s: stage record of %s has a bad address: %s", me.short(), peer.short(), e)
    transport.set_protected(PROTECTED_TAG, [p for p in view.peers if p != me])
    return view
