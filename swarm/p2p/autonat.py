"""AutoNAT-style dial-back: a peer dials us back at the address it sees us connect from, on a fresh connection.

``autonat.dial_back`` (served by every node): the caller names its listening ports and its ``--announce``
addresses; the server dials each port at the caller's observed address, and each announced address whose host
is that observed address (never a third party's: a dial-back cannot be turned against another host), each on a
new connection whose handshake must prove the caller's PeerID, and answers with those that worked, and with a
few other peers it knows (so a node that joined through one peer finds others to ask). A request
that came through a relay's circuit is refused (the observed address would be the relay's).
"""

from __future__ import annotations

import asyncio
import logging

from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import PeerAddress, parse_maddr
from swarm.p2p.reach_messages import MAX_SHARED_PEERS, DialBackReply, DialBackRequest
from swarm.p2p.rpc import RpcContext
from swarm.p2p.transport import Transport
from swarm.errors import AddressError, SwarmError

log = logging.getLogger(__name__)

METHOD = "autonat.dial_back"


class DialBackRefusedError(SwarmError):
    """A dial-back request that cannot be answered truthfully (it came through a relay's circuit)."""

    code = "dial_back_refused"


class AutoNatServer:
    """Serves ``autonat.dial_back`` on a transport: at most ``max_concurrent`` requests dial at a time."""

    def __init__(self, transport: Transport, *, dial_timeout_s: float, max_concurrent: int = 4) -> None:
        self.transport = transport
        self.dial_timeout_s = dial_timeout_s
        self._slots = asyncio.Semaphore(max_concurrent)

    def start(self) -> None:
        self.transport.register(METHOD, DialBackRequest, self.rpc_dial_back)

    def stop(self) -> None:
        self.transport.unregister(METHOD)

    def _targets(self, ctx: RpcContext, req: DialBackRequest) -> list[PeerAddress]:
        observed = ctx.remote_host
        protocol = "ip6" if ":" in observed else "ip4"
        targets = [PeerAddress(host=observed, port=p, protocol=protocol, peer_id=ctx.peer_id) for p in req.ports]
        for text in req.maddrs:
            try:
                addr = parse_maddr(text)
            except AddressError:
                continue
            if addr.relay is None and addr.host == observed:
                targets.append(addr.with_peer_id(ctx.peer_id))
        return list(dict.fromkeys(targets))

    async def rpc_dial_back(self, ctx: RpcContext, req: DialBackRequest) -> DialBackReply:
        if ctx.relayed:
            raise DialBackRefusedError(
                "this request came through a relay; ask for a dial-back over a direct connection"
            )
        targets = self._targets(ctx, req)
        async with self._slots:
            results = await asyncio.gather(*(self._try(addr) for addr in targets))
        reachable = [addr.to_maddr() for addr, ok in zip(targets, results, strict=True) if ok]
        log.debug(
            "%s: dial-back of %s: %d of %d reachable",
            self.transport.peer_id.short(),
            ctx.peer_id.short(),
            len(reachable),
            len(targets),
        )
        return DialBackReply(reachable=reachable, observed_host=ctx.remote_host, peers=self._peers(ctx.peer_id))

    def _peers(self, asker: PeerID) -> list[str]:
        """A few other peers' direct addresses (the asker's next dial-back candidates)."""
        out = []
        for peer in self.transport.known_peers():
            addr = next((a for a in self.transport.addresses(peer) if a.relay is None), None)
            if peer != asker and addr is not None:
                out.append(addr.to_maddr())
            if len(out) >= MAX_SHARED_PEERS:
                break
        return out

    async def _try(self, addr: PeerAddress) -> bool:
        try:
            async with asyncio.timeout(self.dial_timeout_s):
                await self.transport.dial_back(addr)
        except (SwarmError, TimeoutError, OSError) as e:
            log.debug("%s: dial-back to %s failed: %s", self.transport.peer_id.short(), addr, e)
            return False
        return True


async def call_dial_back(
    transport: Transport, peer: PeerID, *, ports: list[int], maddrs: list[str], timeout_s: float
) -> DialBackReply:
    """Ask ``peer`` to dial us back (``autonat.dial_back``); SwarmError if it cannot answer."""
    return await transport.call(
        peer, METHOD, DialBackRequest(ports=ports, maddrs=maddrs), DialBackReply, timeout_s=timeout_s
    )
