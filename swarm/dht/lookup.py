"""The iterative Kademlia lookup (FIND_NODE / FIND_VALUE), written against a small ``call`` function.

Up to ``alpha`` requests are in flight at once, and the lookup never waits on a whole round: whenever any
request finishes, fails, or has been pending longer than ``slow_after_s`` (it then stops counting against
``alpha`` but may still answer), the closest not-yet-queried candidate is queried. The lookup ends when the
``k`` closest candidates seen (failed ones removed) have all answered, when ``value_quorum`` answers
carried records (FIND_VALUE), when nothing is left to ask, or at ``deadline_s`` (returning what it has).

``rounds`` counts hops: the initial contacts are hop 1 and a contact first learned from a hop-``h`` answer
is hop ``h + 1``; it is the hop of the first value found, else the deepest hop among the ``k`` closest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from swarm.p2p.identity import PeerID
from swarm.dht.records import Record
from swarm.dht.routing import Contact
from swarm.configs import Config, setting
from swarm.errors import SwarmError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LookupReply:
    """What one queried peer answered: closer contacts and, for FIND_VALUE, the records it holds."""

    contacts: Sequence[Contact] = ()
    records: Sequence[Record] = ()


Call = Callable[[Contact], Awaitable[LookupReply]]


class LookupParams(Config, section="lookup"):
    """Knobs of one lookup; every duration in seconds."""

    k: int = setting(default=20, ge=1, doc="Closest peers the lookup converges on.")
    alpha: int = setting(default=3, ge=1, doc="Requests in flight at once.")
    call_timeout_s: float = setting(default=3.0, gt=0, doc="Deadline of one request.")
    slow_after_s: float = setting(default=1.0, gt=0, doc="A request slower than this frees its slot for another.")
    deadline_s: float = setting(default=6.0, gt=0, doc="Deadline of the whole lookup.")
    value_quorum: int | None = setting(
        default=None, ge=1, doc="FIND_VALUE: stop after this many answers with records (None: FIND_NODE)."
    )


@dataclass
class LookupResult:
    """The outcome: the closest peers that answered, the records found, and counters."""

    closest: list[Contact] = field(default_factory=list)
    found: list[tuple[Contact, list[Record]]] = field(default_factory=list)
    without_value: list[Contact] = field(default_factory=list)  # answered FIND_VALUE with no record
    rounds: int = 0
    num_queried: int = 0
    num_failed: int = 0
    timed_out: bool = False


_NEW, _PENDING, _ANSWERED, _FAILED = range(4)


@dataclass
class _Candidate:
    contact: Contact
    distance: int
    hop: int
    state: int = _NEW
    started_s: float = 0.0


class _Lookup:
    def __init__(self, target_id: int, call: Call, params: LookupParams, exclude: set[PeerID]) -> None:
        self.target_id = target_id
        self.call = call
        self.params = params
        self.exclude = exclude
        self.candidates: dict[PeerID, _Candidate] = {}
        self.order: list[_Candidate] = []  # sorted by distance
        self.result = LookupResult()
        self.tasks: dict[asyncio.Task[LookupReply], _Candidate] = {}

    def add(self, contact: Contact, hop: int) -> None:
        if contact.peer_id in self.exclude or contact.peer_id in self.candidates:
            return
        cand = _Candidate(contact, contact.node_id ^ self.target_id, hop)
        self.candidates[contact.peer_id] = cand
        lo, hi = 0, len(self.order)
        while lo < hi:  # insertion into the distance-sorted list
            mid = (lo + hi) // 2
            if self.order[mid].distance < cand.distance:
                lo = mid + 1
            else:
                hi = mid
        self.order.insert(lo, cand)

    def closest_alive(self) -> list[_Candidate]:
        alive: list[_Candidate] = []
        for cand in self.order:
            if cand.state != _FAILED:
                alive.append(cand)
                if len(alive) == self.params.k:
                    break
        return alive

    def value_done(self) -> bool:
        quorum = self.params.value_quorum
        return quorum is not None and len(self.result.found) >= quorum

    def launch(self, now_s: float) -> None:
        active = sum(1 for c in self.tasks.values() if now_s - c.started_s < self.params.slow_after_s)
        for cand in self.closest_alive():
            if active >= self.params.alpha:
                return
            if cand.state == _NEW:
                cand.state, cand.started_s = _PENDING, now_s
                self.tasks[asyncio.ensure_future(self._query(cand.contact))] = cand
                self.result.num_queried += 1
                active += 1

    async def _query(self, contact: Contact) -> LookupReply:
        async with asyncio.timeout(self.params.call_timeout_s):
            return await self.call(contact)

    def finish(self, task: asyncio.Task[LookupReply]) -> None:
        cand = self.tasks.pop(task)
        try:
            reply = task.result()
        except (SwarmError, OSError, TimeoutError) as e:
            cand.state = _FAILED
            self.result.num_failed += 1
            log.debug("lookup: %s failed: %s", cand.contact.peer_id.short(), e)
            return
        cand.state = _ANSWERED
        for contact in reply.contacts:
            self.add(contact, cand.hop + 1)
        if reply.records:
            self.result.found.append((cand.contact, list(reply.records)))
            if self.result.rounds == 0:
                self.result.rounds = cand.hop
        elif self.params.value_quorum is not None:
            self.result.without_value.append(cand.contact)

    def settled(self) -> bool:
        closest = self.closest_alive()
        return all(c.state == _ANSWERED for c in closest)

    async def run(self) -> LookupResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.params.deadline_s
        try:
            while not self.value_done():
                now = loop.time()
                self.launch(now)
                if not self.tasks or self.settled():
                    break
                if now >= deadline:
                    self.result.timed_out = True
                    break
                slow_at = [c.started_s + self.params.slow_after_s for c in self.tasks.values()]
                wake = min([t for t in slow_at if t > now], default=deadline)
                timeout = max(0.0, min(deadline, wake) - now)
                done, _ = await asyncio.wait(self.tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self.finish(task)
        finally:
            for task in self.tasks:
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
        return self.summarize()

    def summarize(self) -> LookupResult:
        answered = [c for c in self.order if c.state == _ANSWERED][: self.params.k]
        self.result.closest = [c.contact for c in answered]
        if self.result.rounds == 0:
            self.result.rounds = max((c.hop for c in answered), default=0)
        self.result.without_value.sort(key=lambda c: c.node_id ^ self.target_id)
        return self.result


async def iterative_lookup(
    target_id: int,
    initial: Iterable[Contact],
    call: Call,
    params: LookupParams,
    *,
    exclude: Iterable[PeerID] = (),
) -> LookupResult:
    """Run one iterative lookup for ``target_id`` starting from ``initial`` contacts (see module doc)."""
    lookup = _Lookup(target_id, call, params, set(exclude))
    for contact in initial:
        lookup.add(contact, 1)
    return await lookup.run()
