"""The relays of a node behind NAT: it holds reservations at ``count`` relays and answers their circuits.

Relays are public peers (a peer that is not refuses the reservation). Candidates are ranked by rendezvous
hashing of (our PeerID, the relay's PeerID), so relayed nodes spread evenly over the relays without talking to
each other; a relay that refused is left alone for a while (1 s, doubling, at most ``retry_s``). A reservation
is renewed when half its TTL is gone; a relay whose connection closes or whose renewal fails is dropped at
once and the next candidate reserved (``maintain``), so a node moves to another relay when one goes away.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from swarm.p2p.circuit import CircuitRefusedError
from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import PeerAddress, circuit_address
from swarm.p2p.reach_messages import IncomingReply, IncomingRequest, ReserveReply, ReserveRequest
from swarm.p2p.rpc import RpcContext
from swarm.p2p.transport import Transport
from swarm.errors import SwarmError

log = logging.getLogger(__name__)


@dataclass
class _Held:
    addr: PeerAddress  # the relay's direct address
    ttl_s: float
    expires_at: float


class RelaySet:
    """Reservations at up to ``count`` relays (see the module docstring)."""

    def __init__(
        self,
        transport: Transport,
        *,
        count: int,
        retry_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.transport = transport
        self.count = count
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._on_change = on_change
        self._me = transport.peer_id
        self.held: dict[PeerID, _Held] = {}
        self._backoff: dict[PeerID, float] = {}
        self._failures: dict[PeerID, int] = {}

    def start(self) -> None:
        self.transport.register("relay.incoming", IncomingRequest, self.rpc_incoming)
        self.transport.on_peer_disconnected(self._disconnected)

    def stop(self) -> None:
        self.transport.unregister("relay.incoming")
        self.held.clear()

    @property
    def relays(self) -> list[PeerID]:
        return list(self.held)

    def circuit_maddrs(self) -> tuple[str, ...]:
        """Our circuit addresses, one per relay held."""
        return tuple(circuit_address(h.addr, self._me).to_maddr() for h in self.held.values())

    def _disconnected(self, peer: PeerID, _addr: PeerAddress) -> None:
        if self.held.pop(peer, None) is not None:
            log.info("%s: lost relay %s (its connection closed); picking another", self._me.short(), peer.short())
            self._backoff[peer] = self._clock() + self.retry_s
            self._on_change()

    def _rank(self, candidates: Iterable[PeerID]) -> list[PeerID]:
        me = self._me.to_bytes()
        return sorted(candidates, key=lambda p: hashlib.sha256(me + p.to_bytes()).digest())

    def _direct_address(self, peer: PeerID) -> PeerAddress | None:
        return next((a for a in self.transport.addresses(peer) if a.relay is None), None)

    async def maintain(self, candidates: Iterable[PeerID]) -> None:
        """Drop lost or expired relays, renew the others when half their TTL is gone, fill up to ``count``."""
        now = self._clock()
        for peer, held in list(self.held.items()):
            if held.expires_at <= now or not self.transport.is_connected(peer):
                self._drop(peer, "its reservation expired or its connection closed")
            elif held.expires_at - now < held.ttl_s / 2 and not await self._reserve(peer, held.addr):
                self._drop(peer, "the renewal failed")
        for peer in self._rank(candidates):
            if len(self.held) >= self.count:
                break
            if peer == self._me or peer in self.held or self._backoff.get(peer, 0.0) > now:
                continue
            addr = self._direct_address(peer)
            if addr is not None and await self._reserve(peer, addr):
                log.info("%s: reserved at relay %s (%s)", self._me.short(), peer.short(), addr)
                self._on_change()

    def _drop(self, peer: PeerID, why: str) -> None:
        if self.held.pop(peer, None) is not None:
            log.info("%s: dropping relay %s: %s", self._me.short(), peer.short(), why)
            self._backoff[peer] = self._clock() + self.retry_s
            self._on_change()

    async def _reserve(self, peer: PeerID, addr: PeerAddress) -> bool:
        try:
            reply = await self.transport.call(
                addr, "relay.reserve", ReserveRequest(), ReserveReply, timeout_s=self.timeout_s
            )
        except SwarmError as e:
            reply = ReserveReply(ttl_s=0.0, reservations=0, refused=f"{e.code}: {e}")
        if reply.refused or reply.ttl_s <= 0:
            log.debug("%s: relay %s refused a reservation: %s", self._me.short(), peer.short(), reply.refused)
            failures = self._failures[peer] = self._failures.get(peer, 0) + 1
            self._backoff[peer] = self._clock() + min(self.retry_s, 0.5 * 2**failures)
            return False
        self._failures.pop(peer, None)
        self.held[peer] = _Held(addr=addr, ttl_s=reply.ttl_s, expires_at=self._clock() + reply.ttl_s)
        return True

    async def rpc_incoming(self, ctx: RpcContext, req: IncomingRequest) -> IncomingReply:
        """A relay we hold a reservation at has a dialler for us: connect back with its token."""
        held = self.held.get(ctx.peer_id)
        if held is None:
            raise CircuitRefusedError(f"{self._me.short()} holds no reservation at {ctx.peer_id.short()}")
        await self.transport.accept_circuit(held.addr, req.token)
        return IncomingReply()
