"""Matchmaking through the DHT: peers ready under one group key agree on one ordered membership.

The rule (see docs/averaging.md):

1. A peer ready to average stores ``(ready_at, weight, bandwidth, client_mode, maddrs, state_digest,
   state_age_steps)`` under the group key, subkey ``[owner:<its PeerID>]`` (signed), and gathers: it re-reads
   the key until ``target_group_size``
   entries are visible or ``matchmaking_time_s`` has passed. If then another peer ranks first among what it
   sees, it tells that peer to re-read the key at once (``avg.ready``): that peer may have read the key just
   before this entry landed, and would otherwise see it only at its next poll.
2. Members are ranked by ``(ready_at, PeerID bytes)``. At the end of its window, a peer that ranks first among
   the entries it sees is the **leader**: it asks the others it sees (best ranked first, up to the target) to
   join (``avg.join``); a peer accepts the first leader that ranks before it while it is still looking, and
   from then on accepts no other. The leader sends the final ordered membership to those who accepted
   (``avg.begin``), with ``round_id = sha256(group_key, members)``; each member checks the id and membership.
3. A peer that is not a leader waits up to ``join_timeout_s`` for a leader's begin. A group smaller than
   ``min_group_size``, or no begin in time, means the peer averages alone. While it waits without a leader it
   re-reads the key: when the peers ranked before it have withdrawn (below), it leads the peers still looking.
4. A peer done with matchmaking (in a group or alone) **withdraws**: it replaces its entry with
   ``{"closed": true}`` (a later expiration wins), so peers that come later neither wait for it to lead nor
   count it as a peer still to come. Gathering also stops once looking + withdrawn entries reach the target.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import parse_maddr
from swarm.p2p.messages import Message
from swarm.dht.keys import owner_subkey
from swarm.p2p import RpcContext, Transport
from swarm.averaging.allreduce import AllReduceServer, Group
from swarm.averaging.config import AveragerConfig
from swarm.averaging.messages import (
    MAX_GROUP_SIZE,
    BeginReply,
    GROUP_SCHEMA,
    BeginRequest,
    GroupEntry,
    GroupWithdrawal,
    JoinReply,
    JoinRequest,
    MemberInfo,
    ReadyHint,
    ReadyHintReply,
    round_id_of,
)
from swarm.errors import AddressError, ProtocolError, SwarmError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
MAX_PENDING_WITHDRAWALS = 1024


class GroupStore(Protocol):
    """What matchmaking needs from the DHT (``dht.DHT`` implements it): store a subkey, read all subkeys."""

    async def store(self, key: str, value: Any, expiration_time: float, subkey: Any = None) -> bool: ...

    async def get(self, key: str, latest: bool = False) -> Any: ...


@dataclass(kw_only=True)
class _Looking:
    """Our state while forming a group under one key."""

    me: MemberInfo
    target: int
    phase: str = "gathering"  # gathering -> leading | following -> done
    leader: bytes | None = None
    begin: asyncio.Future[BeginRequest] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    expiration_time: float = 0.0  # of our entry under the key; the withdrawal is stored just after it
    exclude: frozenset[bytes] = frozenset()  # PeerIDs we neither recruit nor follow (caught by gradient checks)
    seen: frozenset[bytes] = frozenset()  # PeerIDs our last read of the key found (a hint from one wakes nothing)


def alone(group_key: str, me: MemberInfo) -> Group:
    """The one-member group a peer averages in when no group forms."""
    return Group(group_key=group_key, round_id=round_id_of(group_key, (me,)), members=(me,), my_index=0)


class Matchmaker:
    """Forms groups under a key through the DHT and the ``avg.join`` / ``avg.begin`` RPCs."""

    def __init__(
        self,
        config: AveragerConfig,
        transport: Transport,
        dht: GroupStore,
        server: AllReduceServer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.transport = transport
        self.dht = dht
        self.server = server
        self.clock = clock
        self._looking: dict[str, _Looking] = {}
        self._stored: dict[str, float] = {}  # keys of formed groups whose entry is not withdrawn yet -> its expiry
        self._withdrawing: set[asyncio.Task[None]] = set()  # `withdraw_soon`'s tasks, cancelled by `unregister`

    def register(self) -> None:
        self.transport.register("avg.join", JoinRequest, self.rpc_join)
        self.transport.register("avg.begin", BeginRequest, self.rpc_begin)
        self.transport.register("avg.ready", ReadyHint, self.rpc_ready)

    def unregister(self) -> None:
        """Stop serving the matchmaking RPCs and cancel the withdrawals still in flight."""
        for method in ("avg.join", "avg.begin", "avg.ready"):
            self.transport.unregister(method)
        for task in list(self._withdrawing):
            task.cancel()

    def withdraw_soon(self, group_key: str) -> None:
        """`withdraw` in the background: it is for later peers, so the caller's round never waits for the DHT store
        (bounded by ``rpc_timeout_s`` as `withdraw` is; cancelled by `unregister`)."""
        if group_key not in self._stored:
            return
        task = asyncio.get_running_loop().create_task(self.withdraw(group_key))
        self._withdrawing.add(task)
        task.add_done_callback(self._withdrawing.discard)

    async def settled(self) -> None:
        """Wait until the withdrawals started by `withdraw_soon` are done (each is bounded by ``rpc_timeout_s``)."""
        while self._withdrawing:
            await asyncio.gather(*list(self._withdrawing), return_exceptions=True)

    def my_info(self, weight: float, *, state_digest: bytes = b"", state_age_steps: int = 0) -> MemberInfo:
        return MemberInfo(
            peer_id=self.transport.peer_id.to_bytes(),
            maddrs=tuple(self.transport.listen_maddrs),
            ready_at=self.clock(),
            weight=weight,
            bandwidth=self.config.bandwidth,
            client_mode=self.config.client_mode,
            state_digest=state_digest,
            state_age_steps=state_age_steps,
        )

    async def form_group(
        self,
        group_key: str,
        weight: float,
        *,
        target_group_size: int | None = None,
        exclude: Collection[PeerID] = (),
        withdraw: bool = True,
        state_digest: bytes = b"",
        state_age_steps: int = 0,
    ) -> Group:
        """Agree on a group under ``group_key`` (or return a group of one); bounded by the config's deadlines.

        ``target_group_size`` (default: the config's) is where gathering stops and the most a leader recruits.
        Peers in ``exclude`` are neither counted, recruited nor followed. With ``withdraw=False`` the caller
        withdraws our entry itself (:meth:`withdraw`), e.g. while the all-reduce already runs. ``state_digest`` and
        ``state_age_steps`` go into our entry, so the final membership carries them (`swarm.averaging.digests`).
        """
        if group_key in self._looking:
            raise SwarmError(f"already averaging under {group_key!r}; call step() once per key at a time")
        target = self.config.target_group_size if target_group_size is None else target_group_size
        if not isinstance(target, int) or isinstance(target, bool) or not 1 <= target <= MAX_GROUP_SIZE:
            raise SwarmError(f"target_group_size must be an int in [1, {MAX_GROUP_SIZE}], got {target!r}")
        me = self.my_info(weight, state_digest=state_digest, state_age_steps=state_age_steps)
        state = _Looking(me=me, target=target, exclude=frozenset(p.to_bytes() for p in exclude))
        self._looking[group_key] = state
        self.server.forming(group_key, True)
        try:
            group = await self._form(group_key, state)
        finally:
            state.phase = "done"
            self._looking.pop(group_key, None)
            self.server.forming(group_key, False)
        self._stored[group_key] = state.expiration_time
        while len(self._stored) > MAX_PENDING_WITHDRAWALS:  # a caller cancelled before withdrawing: forget the oldest
            self._stored.pop(next(iter(self._stored)))
        if withdraw:
            await self.withdraw(group_key)
        return group

    async def _form(self, group_key: str, state: _Looking) -> Group:
        me = state.me
        value = GroupEntry.of(me).to_wire()
        state.expiration_time = self.clock() + self.config.record_ttl_s
        await self.dht.store(group_key, value, state.expiration_time, subkey=owner_subkey(self.transport.peer_id))
        seen = await self._gather(group_key, state)
        first = min(seen, key=MemberInfo.rank)
        if state.phase == "gathering" and first.peer_id != me.peer_id:
            await self._hint(group_key, first)  # it may have read the key before our entry landed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.join_timeout_s
        while True:
            if state.phase in ("gathering", "waiting") and len(seen) == 1:
                log.info("%s: nobody else under %r; averaging alone", self.transport.peer_id.short(), group_key)
                return alone(group_key, me)
            if state.phase in ("gathering", "waiting") and min(seen, key=MemberInfo.rank).peer_id == me.peer_id:
                state.phase = "leading"
                return await self._lead(group_key, state, seen)
            if state.phase == "gathering":
                state.phase = "waiting"
            try:
                async with asyncio.timeout(min(self.config.poll_interval_s, max(0.0, deadline - loop.time()))):
                    begin = await asyncio.shield(state.begin)
                break
            except TimeoutError:
                if loop.time() >= deadline:
                    log.info(
                        "%s: no group under %r in time; averaging alone", self.transport.peer_id.short(), group_key
                    )
                    return alone(group_key, me)
            if state.phase == "waiting":  # no leader yet: has the one ranked first among us withdrawn?
                seen = (await self._entries(group_key, me, state.exclude))[0]
        index = next((i for i, m in enumerate(begin.members) if m.peer_id == me.peer_id), None)
        if index is None:
            log.info("%s: the leader closed %r without us; averaging alone", self.transport.peer_id.short(), group_key)
            return alone(group_key, me)
        return Group(group_key=group_key, round_id=begin.round_id, members=begin.members, my_index=index)

    async def _gather(self, group_key: str, state: _Looking) -> list[MemberInfo]:
        """Re-read the key until the target is visible (looking or withdrawn), the window ends, or a leader
        recruits us."""
        loop = asyncio.get_running_loop()
        window_end = loop.time() + self.config.matchmaking_time_s
        seen = [state.me]
        while state.phase == "gathering":
            seen, withdrawn = await self._entries(group_key, state.me, state.exclude)
            state.seen = frozenset(m.peer_id for m in seen)
            if len(seen) + withdrawn >= state.target or loop.time() >= window_end:
                break
            state.wake.clear()
            try:
                async with asyncio.timeout(min(self.config.poll_interval_s, max(0.0, window_end - loop.time()))):
                    await state.wake.wait()
            except TimeoutError:
                pass
        return seen

    async def _entries(
        self, group_key: str, me: MemberInfo, exclude: frozenset[bytes] = frozenset()
    ) -> tuple[list[MemberInfo], int]:
        """Entries still looking under the key (ours included, ``exclude`` left out), parsed, and the number of
        withdrawn ones; entries that break `GROUP_SCHEMA` are skipped with a warning."""
        found = await self.dht.get(group_key, latest=True)
        members = {me.peer_id: me}
        withdrawn = 0
        for entry in GROUP_SCHEMA.entries(found):
            if entry.owner is None:
                continue
            if isinstance(entry.value, GroupWithdrawal):
                # owner subkeys are signed by their owner: one withdrawal per peer, never forged
                withdrawn += entry.owner != self.transport.peer_id
                continue
            if isinstance(entry.value, GroupEntry):
                member = entry.value.member(entry.owner.to_bytes())
                if member.peer_id not in members and member.peer_id not in exclude:
                    members[member.peer_id] = member
        return list(members.values()), withdrawn

    async def _hint(self, group_key: str, first: MemberInfo) -> None:
        """Tell the peer ranked first that we are here (``avg.ready``), bounded by ``poll_interval_s``: it would
        see us at its next poll anyway, so a failure costs at most one poll and only logs at debug level."""
        self._learn_addresses(first)
        peer = PeerID(first.peer_id)
        try:
            await self.transport.call(
                peer, "avg.ready", ReadyHint(group_key=group_key), ReadyHintReply, timeout_s=self.config.poll_interval_s
            )
        except (SwarmError, OSError) as e:
            log.debug("%s: avg.ready to %s failed: %s", self.transport.peer_id.short(), peer.short(), e)

    async def withdraw(self, group_key: str) -> None:
        """Replace our entry under ``group_key`` (if a formed group left one) by ``{"closed": true}``, bounded by
        ``rpc_timeout_s``; a failure only logs."""
        expiration_time = self._stored.pop(group_key, None)
        if expiration_time is None:
            return
        try:
            async with asyncio.timeout(self.config.rpc_timeout_s):
                await self.dht.store(
                    group_key,
                    GroupWithdrawal(closed=True).to_wire(),
                    math.nextafter(expiration_time, math.inf),
                    subkey=owner_subkey(self.transport.peer_id),
                )
        except (SwarmError, OSError, TimeoutError) as e:
            log.warning("%s: could not withdraw from %r: %s", self.transport.peer_id.short(), group_key, e)

    async def _lead(self, group_key: str, state: _Looking, seen: list[MemberInfo]) -> Group:
        """Recruit the peers we see, then send the final membership to those who accepted."""
        me = state.me
        candidates = sorted((m for m in seen if m.peer_id != me.peer_id), key=MemberInfo.rank)
        candidates = candidates[: state.target - 1]
        request = JoinRequest(group_key=group_key, leader=me)
        replies = await asyncio.gather(*(self._call(m, "avg.join", request, JoinReply) for m in candidates))
        accepted = [m for m, r in zip(candidates, replies, strict=False) if r is not None and r.accepted]
        members = tuple(sorted([me, *accepted], key=MemberInfo.rank))
        min_size = min(self.config.min_group_size, state.target)
        if len(members) < min_size:
            log.info(
                "%s: only %d of min %d peers joined under %r; averaging alone",
                self.transport.peer_id.short(),
                len(members),
                min_size,
                group_key,
            )
            members = (me,)
        round_id = round_id_of(group_key, members)
        self.server.expect(group_key, round_id)
        begin = BeginRequest(group_key=group_key, round_id=round_id, members=members)
        await asyncio.gather(*(self._call(m, "avg.begin", begin, BeginReply) for m in accepted))
        return Group(group_key=group_key, round_id=round_id, members=members, my_index=members.index(me))

    async def _call(self, member: MemberInfo, method: str, request: Message, reply_type: type[M]) -> M | None:
        peer = PeerID(member.peer_id)
        self._learn_addresses(member)
        try:
            return await self.transport.call(peer, method, request, reply_type, timeout_s=self.config.rpc_timeout_s)
        except (SwarmError, OSError) as e:
            log.warning("%s: %s to %s failed: %s", self.transport.peer_id.short(), method, peer.short(), e)
            return None

    def _learn_addresses(self, member: MemberInfo) -> None:
        peer = PeerID(member.peer_id)
        addrs = []
        for text in member.maddrs:
            try:
                addrs.append(parse_maddr(text))
            except AddressError as e:
                log.warning("%s: ignoring a bad address of %s: %s", self.transport.peer_id.short(), peer.short(), e)
        if addrs and peer != self.transport.peer_id:
            self.transport.add_addresses(peer, addrs)

    async def rpc_join(self, ctx: RpcContext, request: JoinRequest) -> JoinReply:
        """Accept the first leader that ranks before us while we are still looking under its key."""
        state = self._looking.get(request.group_key)
        if state is None or state.phase in ("leading", "done"):
            return JoinReply(accepted=False, reason="not looking for a group under this key")
        if request.leader.peer_id != ctx.peer_id.to_bytes():
            return JoinReply(accepted=False, reason="the leader must be the caller")
        if request.leader.peer_id in state.exclude:
            return JoinReply(accepted=False, reason="this peer's gradient checks caught the leader; not following")
        if state.leader is not None:
            return JoinReply(accepted=state.leader == ctx.peer_id.to_bytes(), reason="already following a leader")
        if not request.leader.rank() < state.me.rank():
            return JoinReply(accepted=False, reason="the leader must rank before the follower")
        state.leader = request.leader.peer_id
        state.phase = "following"
        state.wake.set()
        return JoinReply(accepted=True)

    async def rpc_ready(self, ctx: RpcContext, request: ReadyHint) -> ReadyHintReply:
        """A peer announced itself under a key we are gathering under: re-read the key now. Only a caller our last
        read did not find wakes us, so a peer repeating the hint cannot make us read the DHT in a loop."""
        state = self._looking.get(request.group_key)
        caller = ctx.peer_id.to_bytes()
        if state is None or state.phase != "gathering" or caller in state.seen or caller in state.exclude:
            return ReadyHintReply(woken=False)
        state.wake.set()
        return ReadyHintReply(woken=True)

    async def rpc_begin(self, ctx: RpcContext, request: BeginRequest) -> BeginReply:
        """Take the leader's final membership if it is the leader we follow and it lists us."""
        state = self._looking.get(request.group_key)
        if state is None or state.leader != ctx.peer_id.to_bytes() or state.begin.done():
            return BeginReply(accepted=False, reason="not following this leader under this key")
        if round_id_of(request.group_key, request.members) != request.round_id:
            raise ProtocolError("round_id does not match the membership; refusing the group")
        listed = state.me.peer_id in {m.peer_id for m in request.members}
        if listed:
            for member in request.members:
                self._learn_addresses(member)
            self.server.expect(request.group_key, request.round_id)
        state.begin.set_result(request)  # not listed: the leader closed the group without us; we go alone
        return BeginReply(accepted=listed, reason="" if listed else "the membership does not list this peer")
