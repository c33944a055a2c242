"""Reachability: whether peers can dial this node, what it announces, and how a node behind NAT stays reachable.

A node asks up to ``probe_peers`` peers at a time to dial it back (``autonat.py``). An address that at least
``min_confirmations`` peers dialled back is confirmed: the node is **public** and announces the confirmed
addresses only. When at least ``min_confirmations`` peers could dial none, it is behind NAT: it announces no
direct address, reserves at ``relays`` relays (``relays.py``) and announces its circuit addresses (**relayed**;
**private** until one is held), and keeps connections open to the peers that need it (its protected peers: the
stage's peers, the drivers, the next stages), which call it over them (reverse connections). Until either is
known (**unknown**) it announces its listen addresses, as before. What it announces and its status are set on
the transport (``Transport.advertised_maddrs``, ``Transport.reachability``), where the DHT and the peer record
read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from enum import StrEnum

from swarm.p2p.autonat import call_dial_back
from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import parse_maddr
from swarm.p2p.relays import RelaySet
from swarm.p2p.transport import Transport
from swarm.configs import Config, setting
from swarm.errors import AddressError, ConfigError, SwarmError

log = logging.getLogger(__name__)

MAX_ANSWERS = 8  # the latest dial-back answers kept (one per peer)
MAX_KEPT_PEERS = 32  # peers a node behind NAT keeps connections to


class Status(StrEnum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"  # behind NAT, no relay held yet
    RELAYED = "relayed"  # behind NAT, reachable through relays


class ReachabilityConfig(Config, section="reachability"):
    """How a node learns whether it is reachable, and what it does behind NAT (docs/transport.md)."""

    enabled: bool = setting(default=True, doc="Check reachability by dial-back; behind NAT use relays.")
    announce: tuple[str, ...] = setting(
        default=(), doc="--announce: addresses port forwarding makes reachable (checked by dial-back too)."
    )
    min_confirmations: int = setting(default=2, ge=1, le=16, doc="Peers that must agree on a dial-back result.")
    probe_peers: int = setting(default=3, ge=1, le=16, doc="Peers asked for a dial-back per round.")
    probe_interval_s: float = setting(default=2.0, gt=0, le=3600, doc="Between rounds while the status is unknown.")
    recheck_interval_s: float = setting(default=120.0, gt=0, le=86400, doc="Between rounds once it is known.")
    dial_back_timeout_s: float = setting(default=5.0, gt=0, le=600, doc="Deadline of one dial-back.")
    relays: int = setting(default=2, ge=0, le=8, doc="Relays a node behind NAT reserves at.")
    relay_retry_s: float = setting(default=10.0, gt=0, le=3600, doc="A relay that refused is left alone this long.")
    tick_s: float = setting(default=1.0, gt=0, le=60, doc="Period of the loop (relays, reverse connections).")

    def validate(self) -> None:
        for maddr in self.announce:
            try:
                addr = parse_maddr(maddr)
            except AddressError as e:
                raise ConfigError(f"reachability.announce: {e}") from None
            if addr.relay is not None:
                raise self.invalid("announce", f"must be direct addresses, got the circuit address {maddr!r}")


class Reachability:
    """Runs the dial-back rounds, the relays and the reverse connections of one node (module docstring).

    ``needed()`` names the peers a node behind NAT keeps connections to (default: the transport's protected
    peers); ``on_change(status, maddrs)`` hears each change of what the node announces.
    """

    def __init__(
        self,
        config: ReachabilityConfig,
        transport: Transport,
        *,
        needed: Callable[[], Iterable[PeerID]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, tuple[str, ...]], None] | None = None,
    ) -> None:
        self.config = config
        self._on_change = on_change  # (status, announced maddrs) after each change
        self.transport = transport
        self._needed = needed or (lambda: transport.protected_peers())
        self._clock = clock
        self._me = transport.peer_id
        self.status = Status.UNKNOWN
        self.confirmed: tuple[str, ...] = ()
        self.answers: OrderedDict[PeerID, frozenset[str]] = OrderedDict()
        self._asked: dict[PeerID, float] = {}
        self._next_probe = 0.0
        self._wake = asyncio.Event()
        self.changed = asyncio.Event()  # set on every change of status or addresses (tests wait on it)
        self.relays = RelaySet(
            transport,
            count=config.relays,
            retry_s=config.relay_retry_s,
            timeout_s=config.dial_back_timeout_s,
            clock=clock,
            on_change=self._wake.set,
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def public(self) -> bool:
        return self.status is Status.PUBLIC

    def start(self) -> None:
        if not self.config.enabled:
            return
        self.relays.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self.relays.stop()
        self.transport.set_advertised(None, Status.UNKNOWN.value)

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except SwarmError as e:  # one failed round must not end reachability
                log.warning("%s: reachability round failed: %s", self._me.short(), e)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick_s):
                    await self._wake.wait()
            self._wake.clear()

    async def step(self) -> None:
        """One pass: a dial-back round when due, then (behind NAT) relays and reverse connections; publish."""
        if self._clock() >= self._next_probe:
            await self.probe_round()
        if self.status in (Status.PRIVATE, Status.RELAYED):
            await self.relays.maintain(self.transport.known_peers())
            await self._keep_connections()
        elif self.relays.held:
            self.relays.held.clear()
        self._publish()

    # -- dial-back --

    def _request(self) -> tuple[list[int], list[str]]:
        ports = sorted({parse_maddr(m).port for m in self.transport.listen_maddrs})
        return ports, list(self.config.announce)

    async def probe_round(self) -> None:
        """Ask up to ``probe_peers`` peers (those asked longest ago first) to dial us back; decide the status."""
        candidates = [p for p in self.transport.known_peers() if p != self._me]
        candidates.sort(key=lambda p: self._asked.get(p, 0.0))
        ports, maddrs = self._request()
        asked = candidates[: self.config.probe_peers]
        now = self._clock()
        for peer in asked:
            self._asked[peer] = now
        timeout_s = self.config.dial_back_timeout_s * 2
        replies = await asyncio.gather(
            *(call_dial_back(self.transport, p, ports=ports, maddrs=maddrs, timeout_s=timeout_s) for p in asked),
            return_exceptions=True,
        )
        for peer, reply in zip(asked, replies, strict=True):
            if isinstance(reply, BaseException):
                log.debug("%s: no dial-back answer from %s: %s", self._me.short(), peer.short(), reply)
                continue
            self.answers[peer] = frozenset(reply.reachable)
            self._learn(reply.peers)
            self.answers.move_to_end(peer)
            while len(self.answers) > MAX_ANSWERS:
                self.answers.popitem(last=False)
        self._decide()
        interval_s = self.config.probe_interval_s if self.status is Status.UNKNOWN else self.config.recheck_interval_s
        self._next_probe = self._clock() + interval_s

    def _learn(self, maddrs: list[str]) -> None:
        """Remember peers a dial-back answer named, where we know no address of them yet (a hint: dialling
        them proves who they are)."""
        for text in maddrs:
            try:
                addr = parse_maddr(text)
            except AddressError:
                continue
            peer = addr.peer_id
            if peer is not None and addr.relay is None and peer != self._me and not self.transport.addresses(peer):
                self.transport.add_addresses(peer, [addr])

    def _decide(self) -> None:
        need = self.config.min_confirmations
        counts: dict[str, int] = {}
        for reachable in self.answers.values():
            for maddr in reachable:
                counts[maddr] = counts.get(maddr, 0) + 1
        confirmed = tuple(sorted(m for m, n in counts.items() if n >= need))
        unreachable = sum(1 for r in self.answers.values() if not r)
        if confirmed:
            status = Status.PUBLIC
        elif unreachable >= need:
            status = Status.RELAYED if self.relays.held else Status.PRIVATE
        else:
            status = Status.UNKNOWN
        if status is not self.status or confirmed != self.confirmed:
            if (status is Status.PUBLIC) != (self.status is Status.PUBLIC) or status is Status.UNKNOWN:
                log.info(
                    "%s: reachability %s (dial-back answers from %d peers%s)",
                    self._me.short(),
                    status.value,
                    len(self.answers),
                    f"; reachable at {', '.join(confirmed)}" if confirmed else "",
                )
            self.status, self.confirmed = status, confirmed

    # -- behind NAT --

    async def _keep_connections(self) -> None:
        """Reopen connections to the peers that need us and can be dialled directly (reverse connections)."""
        relays = set(self.relays.held)
        direct = set(self.transport.known_peers())
        wanted = [p for p in self._needed() if p != self._me and p not in relays and p in direct]
        missing = [p for p in wanted[:MAX_KEPT_PEERS] if not self.transport.is_connected(p)]
        if missing:
            await asyncio.gather(*(self._connect(p) for p in missing))

    async def _connect(self, peer: PeerID) -> None:
        try:
            async with asyncio.timeout(self.config.dial_back_timeout_s):
                await self.transport.connect(peer)
        except (SwarmError, TimeoutError) as e:
            log.debug("%s: cannot keep a connection to %s: %s", self._me.short(), peer.short(), e)

    def _publish(self) -> None:
        if self.status in (Status.PRIVATE, Status.RELAYED):
            self.status = Status.RELAYED if self.relays.held else Status.PRIVATE
        if self.status is Status.PUBLIC:
            maddrs: tuple[str, ...] | None = tuple(
                parse_maddr(m).with_peer_id(self._me).to_maddr() for m in self.confirmed
            )
        elif self.status is Status.UNKNOWN:
            maddrs = None
        else:
            maddrs = self.relays.circuit_maddrs()
        before = (self.transport.advertised_maddrs, self.transport.reachability)
        self.transport.set_advertised(maddrs, self.status.value)
        if (self.transport.advertised_maddrs, self.transport.reachability) != before:
            log.info(
                "%s: %s, announcing %s",
                self._me.short(),
                self.status.value,
                ", ".join(self.transport.advertised_maddrs) or "no address",
            )
            self.changed.set()
            if self._on_change is not None:
                self._on_change(self.status.value, self.transport.advertised_maddrs)
