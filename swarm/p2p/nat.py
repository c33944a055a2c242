"""What every node runs about NAT: it serves dial-backs (``autonat.py``), offers the relay service while it is
public (``relay.py``), and learns its own reachability (``reachability.py``: relays and reverse connections
behind NAT). One object so that a node, a test or a tool starts and stops them together."""

from __future__ import annotations

from collections.abc import Callable

from swarm.p2p.autonat import AutoNatServer
from swarm.p2p.reachability import Reachability, ReachabilityConfig
from swarm.p2p.relay import RelayConfig, RelayService
from swarm.p2p.transport import Transport


class NatServices:
    """Dial-back server, relay service and reachability of one transport; ``start()`` / ``await stop()``."""

    def __init__(
        self,
        transport: Transport,
        reachability: ReachabilityConfig,
        relay: RelayConfig,
        *,
        on_change: Callable[[str, tuple[str, ...]], None] | None = None,
    ) -> None:
        self.autonat = AutoNatServer(transport, dial_timeout_s=reachability.dial_back_timeout_s)
        self.reachability = Reachability(reachability, transport, on_change=on_change)
        self.relay = RelayService(relay, transport, accepting=lambda: self.reachability.public)
        self._started = False

    def start(self) -> None:
        if not self.reachability.config.enabled:
            return
        self.autonat.start()
        self.relay.start()
        self.reachability.start()
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.reachability.stop()
        await self.relay.stop()
        self.autonat.stop()
