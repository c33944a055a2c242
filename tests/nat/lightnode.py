"""A DHT-only node without the training stack (no torch import: it starts in a second, not in ten), with the
same NAT services as `swarm.node.Node`; for the NAT bed's reachability test.

    python -m tests.nat.lightnode --listen MADDR --data-dir DIR --events-file PATH [--initial-peers MADDR]
        [--announce MADDR]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from swarm.dht import DHT, DHTConfig
from swarm.local.events import EventWriter, ListeningEvent, ReachabilityEvent
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity
from swarm.p2p.nat import NatServices
from swarm.p2p.reachability import ReachabilityConfig
from swarm.p2p.relay import RelayConfig


async def run(args: argparse.Namespace) -> None:
    events = EventWriter(Path(args.events_file))
    identity = Identity.load_or_create(Path(args.data_dir) / "identity.pem")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Transport(identity, TransportConfig(listen_maddrs=(args.listen,))) as transport:
        events.emit(ListeningEvent(maddrs=list(transport.listen_maddrs)))
        nat = NatServices(
            transport,
            ReachabilityConfig(announce=tuple(args.announce)),
            RelayConfig(),
            on_change=lambda status, maddrs: events.emit(ReachabilityEvent(status=status, maddrs=list(maddrs))),
        )
        nat.start()
        initial = tuple(args.initial_peers)
        async with DHT.create(DHTConfig(initial_peers=initial), identity=identity, transport=transport):
            await stop.wait()
        await nat.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--events-file", required=True)
    parser.add_argument("--initial-peers", action="append", default=[])
    parser.add_argument("--announce", action="append", default=[])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
