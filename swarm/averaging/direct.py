"""Direct matchmaking: the peers a caller expects in its group agree on it over their own connections, no DHT.

A training stage knows its peers from the run's records, so most steps need no search. Each member ready under a
group key tells every other peer it expects (``avg.announce``, `AnnounceRequest`) its entry and the whole membership
it expects, without waiting for the replies. Once it holds the entry of every peer it expects, and each of those
expects the same membership, the group is those entries ranked by `MemberInfo.rank`, with
``round_id = round_id_of(group_key, members)``: every member computes the same group from the same entries, with no
leader, no ``avg.join`` / ``avg.begin`` and no DHT round trip, half a round trip after the last member is ready.

A member that is told another expectation (a peer that sees another membership), or misses an entry within its
deadline, gives up at once or at the deadline and its caller falls back to matchmaking through the DHT
(`swarm.averaging.matchmaking`), looking only for the peers that announced themselves by the deadline (the missing
ones are not waited for twice). Every announcement carries its sender's expectation, so the members of one
expected set either all form the group directly or all fall back, unless an announcement is lost; the all-reduce
then treats the missing member as a lost peer. Announcements that arrive before this peer is ready under their key
are kept until it is (at most ``MAX_ANNOUNCED_KEYS`` keys, the oldest dropped first, and ``MAX_ANNOUNCED_PER_KEY``
announcements per key), and count only while their sender may still be waiting (they arrived less than the
deadline ago): a peer that comes late, e.g. after catching up, does not form a group with peers that gave up on it.

Announcing ahead (`announce_ahead`): a peer whose step is still open may send its entry early (``early=True``, the
same entry it will be ready with; a training stage does so when its step opens). Its peers then hold it when they
become ready, and a group whose members all announced ahead forms as soon as each is ready, with no announcement
on the step's critical path. `form_group` reuses the entry announced ahead (so every member ranks the same entries)
and sends it again, which renews it under the rule above; an early announcement whose expectation differs is
ignored rather than final (the sender's view may have changed since). While a key is announced ahead, this peer's
all-reduce server holds parts streamed to it under that key until it is ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Collection

from swarm.averaging.messages import AnnounceReply, AnnounceRequest, MemberInfo, round_id_of
from swarm.averaging.owner import AllReduceServer, Group
from swarm.averaging.config import AveragerConfig
from swarm.errors import AddressError, ProtocolError, SwarmError
from swarm.p2p import RpcContext, Transport
from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import parse_maddr

log = logging.getLogger(__name__)

ANNOUNCE_METHOD = "avg.announce"
MAX_ANNOUNCED_KEYS = 16  # keys whose announcements are kept before this peer is ready under them
MAX_ANNOUNCED_PER_KEY = 64  # announcements kept per key (a larger group goes through the DHT)
MAX_AHEAD_KEYS = 2  # keys this peer announced ahead and still holds parts for (the current step's, the next one's)


class DirectMatchmaker:
    """Forms groups of expected peers through ``avg.announce`` (module docstring)."""

    def __init__(self, config: AveragerConfig, transport: Transport, server: AllReduceServer) -> None:
        self.config = config
        self.transport = transport
        self.server = server
        # group key -> announcing PeerID -> (the announcement, when it arrived: loop time)
        self._announced: OrderedDict[str, dict[bytes, tuple[AnnounceRequest, float]]] = OrderedDict()
        self._changed = asyncio.Event()  # set (and replaced) on each announcement taken
        self._sending: set[asyncio.Task[None]] = set()  # announcements in flight, cancelled by `unregister`
        # group key -> the entry and expectation this peer announced ahead under it (`announce_ahead`), oldest first
        self._ahead: OrderedDict[str, AnnounceRequest] = OrderedDict()
        self._active: set[str] = set()  # keys `form_group` is forming under now

    def register(self) -> None:
        self.transport.register(ANNOUNCE_METHOD, AnnounceRequest, self.rpc_announce)

    def unregister(self) -> None:
        """Stop serving ``avg.announce`` and cancel the announcements still in flight."""
        self.transport.unregister(ANNOUNCE_METHOD)
        for task in list(self._sending):
            task.cancel()

    def announce_ahead(self, group_key: str, me: MemberInfo, expected: Collection[PeerID]) -> None:
        """Send ``me`` (the entry this peer will be ready with) to ``expected`` under ``group_key`` before it is ready
        (module docstring), and hold parts streamed to this peer under that key until it is. Keys announced ahead
        before the last `MAX_AHEAD_KEYS` stop being held."""
        request = AnnounceRequest(group_key=group_key, member=me, expected=_ids(expected, me), early=True)
        self._ahead.pop(group_key, None)
        self._ahead[group_key] = request
        while len(self._ahead) > MAX_AHEAD_KEYS:
            old, _ = self._ahead.popitem(last=False)
            if old not in self._active:
                self.server.forming(old, False)
        self.server.forming(group_key, True)
        for peer in request.expected:
            if peer != me.peer_id:
                self._send_soon(PeerID(peer), request)

    def ahead_entry(
        self, group_key: str, expected: Collection[PeerID], state_digest: bytes, age: int
    ) -> MemberInfo | None:
        """The entry this peer announced ahead under ``group_key``, if it did with the same expectation, digest and
        age (`form_group` must then be ready with that entry: its peers may have ranked it already)."""
        request = self._ahead.get(group_key)
        if request is None:
            return None
        me = request.member
        if request.expected != _ids(expected, me) or me.state_digest != state_digest or me.state_age_steps != age:
            return None
        return me

    async def form_group(
        self,
        group_key: str,
        me: MemberInfo,
        expected: Collection[PeerID],
        *,
        timeout_s: float,
        avoid: Collection[PeerID],
    ) -> Group | int:
        """The group of ``expected`` (this peer is added) under ``group_key``; when they do not all expect the same
        membership within ``timeout_s``, the group size to look for through the DHT instead: all of them after
        another expectation, those that announced themselves (and this peer) after the deadline."""
        ids = _ids(expected, me)
        ignored = frozenset(p.to_bytes() for p in avoid)
        request = AnnounceRequest(group_key=group_key, member=me, expected=ids)
        self.server.forming(group_key, True)  # a member that formed the group first may stream to us already
        self._active.add(group_key)
        try:
            for peer in ids:
                if peer != me.peer_id:
                    self._send_soon(PeerID(peer), request)
            members = await self._wait(group_key, me, ids, ignored, timeout_s)
            if isinstance(members, int):
                return members
            round_id = round_id_of(group_key, members)
            self.server.expect(group_key, round_id)
            return Group(group_key=group_key, round_id=round_id, members=members, my_index=members.index(me))
        finally:
            self._active.discard(group_key)
            self._ahead.pop(group_key, None)
            self.server.forming(group_key, False)
            self._announced.pop(group_key, None)

    async def _wait(
        self, group_key: str, me: MemberInfo, ids: tuple[bytes, ...], ignored: frozenset[bytes], timeout_s: float
    ) -> tuple[MemberInfo, ...] | int:
        """The ranked members once every expected peer announced the same expectation; else the group size to look
        for through the DHT (`form_group`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            # an announcement older than the deadline is its sender's given-up try (e.g. this peer was catching up)
            fresh_since = loop.time() - timeout_s
            got = {
                p: a
                for p, (a, at) in self._announced.get(group_key, {}).items()
                if p not in ignored and at >= fresh_since and (a.expected == ids or not a.early)
            }
            other = next((a for a in got.values() if a.expected != ids), None)
            if other is not None:
                log.info(
                    "%s: %s expects another group under %r (%d peers, we expect %d); matchmaking through the DHT",
                    self.transport.peer_id.short(),
                    PeerID(other.member.peer_id).short(),
                    group_key,
                    len(other.expected),
                    len(ids),
                )
                return len(ids)
            if all(p in got for p in ids if p != me.peer_id):
                for announced in got.values():
                    self._learn_addresses(announced.member)
                return tuple(sorted([me, *(got[p].member for p in ids if p != me.peer_id)], key=MemberInfo.rank))
            changed = self._changed
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await changed.wait()
            except TimeoutError:
                missing = [PeerID(p).short() for p in ids if p != me.peer_id and p not in got]
                log.info(
                    "%s: no announcement from %s under %r within %.1fs; matchmaking through the DHT",
                    self.transport.peer_id.short(),
                    ", ".join(missing),
                    group_key,
                    timeout_s,
                )
                return 1 + sum(p in got for p in ids if p != me.peer_id)

    def _send_soon(self, peer: PeerID, request: AnnounceRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._send(peer, request))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, peer: PeerID, request: AnnounceRequest) -> None:
        try:
            await self.transport.call(
                peer, ANNOUNCE_METHOD, request, AnnounceReply, timeout_s=self.config.rpc_timeout_s
            )
        except (SwarmError, TimeoutError, OSError) as e:
            log.debug("%s: avg.announce to %s failed: %s", self.transport.peer_id.short(), peer.short(), e)

    async def rpc_announce(self, ctx: RpcContext, request: AnnounceRequest) -> AnnounceReply:
        """Keep a peer's announcement under its key (the caller can only announce itself) and wake the waiter."""
        if request.member.peer_id != ctx.peer_id.to_bytes():
            raise ProtocolError("an announcement must carry the caller's own entry")
        entries = self._announced.get(request.group_key)
        if entries is None:
            entries = self._announced[request.group_key] = {}
            while len(self._announced) > MAX_ANNOUNCED_KEYS:
                self._announced.popitem(last=False)
        if request.member.peer_id not in entries and len(entries) >= MAX_ANNOUNCED_PER_KEY:
            raise SwarmError(f"more than {MAX_ANNOUNCED_PER_KEY} announcements under {request.group_key!r}")
        entries[request.member.peer_id] = (request, asyncio.get_running_loop().time())
        self._changed.set()
        self._changed = asyncio.Event()
        return AnnounceReply(taken=True)

    def _learn_addresses(self, member: MemberInfo) -> None:
        addrs = []
        for text in member.maddrs:
            try:
                addrs.append(parse_maddr(text))
            except AddressError as e:
                log.warning("%s: ignoring a bad address: %s", self.transport.peer_id.short(), e)
        peer = PeerID(member.peer_id)
        if addrs and peer != self.transport.peer_id:
            self.transport.add_addresses(peer, addrs)


def _ids(expected: Collection[PeerID], me: MemberInfo) -> tuple[bytes, ...]:
    """The expected membership as sorted PeerID bytes, this peer's included."""
    return tuple(sorted({p.to_bytes() for p in expected} | {me.peer_id}))
