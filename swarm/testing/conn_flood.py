"""Connection floods against one listener, for the tests and demos of the connection budgets (docs/transport.md).

Kinds:

* ``handshaken``: each connection completes a real Noise XX handshake under a fresh identity, then sends a PING
  every ``ping_interval_s`` (and never anything else);
* ``silent``: each connection is a TCP connection that never sends a byte.

With ``reopen`` every connection that closes is opened again at once, so the flood keeps ``count`` connections
open or opening. Connections are spread round-robin over ``sources``, the local addresses they are bound to
(``127.0.0.2`` ... give several source addresses on one Linux machine). A refusal record from the listener
(swarm/p2p/refusal.py) is counted. Run as a process::

    python -m swarm.testing.conn_flood --target /ip4/127.0.0.1/tcp/PORT --kind handshaken --count 512 \\
        --sources 127.0.0.2,127.0.0.3 --ping-interval 30

It prints ``ready <stats as JSON>`` once the first wave is open, then a stats line every second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.configs import Config, setting
from swarm.p2p.framing import FRAME_HEADER, PING_PAYLOAD_BYTES, RECORD_PREFIX, FrameType
from swarm.p2p.identity import Identity
from swarm.p2p.maddr import parse_maddr
from swarm.p2p.noise import CipherState, HandshakeState, make_payload
from swarm.p2p.refusal import parse_refusal

KINDS = ("handshaken", "silent")


class FloodConfig(Config, section="flood"):
    """One flood: its target, kind, size, source addresses and pace."""

    host: str = setting(doc="Address of the listener to flood.")
    port: int = setting(ge=0, le=65535, doc="TCP port of the listener to flood.")
    kind: str = setting(default="handshaken", choices=KINDS, doc="handshaken (Noise, then PINGs) or silent (TCP only).")
    count: int = setting(default=512, ge=1, le=100_000, doc="Connections kept open or opening.")
    sources: tuple[str, ...] = setting(default=("127.0.0.1",), doc="Local addresses the connections are bound to.")
    ping_interval_s: float = setting(default=30.0, gt=0, le=86400, doc="handshaken: seconds between PINGs.")
    connect_timeout_s: float = setting(default=5.0, gt=0, le=600, doc="Deadline of opening (and handshaking) one.")
    reopen: bool = setting(default=True, doc="Open every connection that closes again at once.")
    concurrency: int = setting(
        default=16, ge=1, le=10_000, doc="Connections being opened (handshaken: and in the handshake) at once."
    )
    seed: int = setting(default=0, doc="Seed of the flood's identities and PING tokens.")

    def validate(self) -> None:
        if not self.sources:
            raise self.invalid("sources", "must name at least one local address")


class _FloodConnection(asyncio.Protocol):
    """One attacking connection: the initiator's side of XX (handshaken) or nothing at all (silent)."""

    def __init__(self, flood: ConnFlood, source: str, identity: Identity | None) -> None:
        self.flood = flood
        self.source = source
        self.identity = identity
        self.transport: asyncio.Transport | None = None
        self.send: CipherState | None = None
        self._hs: HandshakeState | None = None
        self._static = X25519PrivateKey.generate() if identity is not None else None
        self._buffer = bytearray()
        self.gone = False
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # handshake over or closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._static is not None:
            self._hs = HandshakeState(initiator=True, static_key=self._static)
            self._write_record(self._hs.write_message(b""))

    def _write_record(self, message: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(RECORD_PREFIX.pack(len(message)) + message)

    def data_received(self, data: bytes) -> None:
        if self.send is not None:
            return  # handshaken: PONGs and whatever else are ignored
        self._buffer += data
        if len(self._buffer) < 2:
            return
        size = RECORD_PREFIX.unpack_from(self._buffer)[0]
        if len(self._buffer) < 2 + size:
            return
        record = bytes(self._buffer[2 : 2 + size])
        self._buffer.clear()
        try:
            if parse_refusal(record) is not None:
                self.flood.stats["refusals"] += 1
                self.close()
            elif self._hs is not None and self.identity is not None and self._static is not None:
                self._hs.read_message(record)
                self._write_record(self._hs.write_message(make_payload(self.identity, self._static)))
                self.send, _ = self._hs.split()
                self.flood.stats["handshakes"] += 1
                self._settle()
        except Exception:  # an attacker does not care why; it counts and goes on
            self.flood.stats["errors"] += 1
            self.close()

    def ping(self, token: bytes) -> None:
        if self.send is not None and self.transport is not None and not self.transport.is_closing():
            frame = FRAME_HEADER.pack(0, FrameType.PING, 0, len(token)) + token
            self._write_record(self.send.encrypt_with_ad(b"", frame))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _settle(self) -> None:
        if not self.settled.done():
            self.settled.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._settle()
        self.flood.lost(self)


class ConnFlood:
    """Opens ``config.count`` connections and (with ``reopen``) keeps them open; ``stop()`` closes everything."""

    def __init__(self, config: FloodConfig) -> None:
        self.config = config
        self.stats: dict[str, int] = {"opened": 0, "closed": 0, "handshakes": 0, "refusals": 0, "errors": 0}
        self._rng = random.Random(config.seed)
        self._live: set[_FloodConnection] = set()
        self._opening = 0
        self._next_source = 0
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._first_wave = asyncio.Event()
        self._attempts_done = 0
        self._running = False

    def live(self, source: str | None = None) -> int:
        """Connections open now (of ``source``); for ``handshaken`` only those past the handshake count."""
        handshaken = self.config.kind == "handshaken"
        return sum(
            1 for c in self._live if (source is None or c.source == source) and (c.send is not None or not handshaken)
        )

    async def start(self, settle_s: float = 0.3, timeout_s: float = 60.0) -> None:
        """Open the first wave: return ``settle_s`` after each of its connections was opened (handshaken: and
        its handshake finished or failed), or after ``timeout_s``."""
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks.add(loop.create_task(self._keep_open()))
        if self.config.kind == "handshaken":
            self._tasks.add(loop.create_task(self._ping_loop()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._first_wave.wait()
        await asyncio.sleep(settle_s)  # the last replies (handshake ends, refusals, evictions) land

    async def stop(self) -> None:
        self._running = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for conn in list(self._live):
            conn.close()
        for _ in range(100):  # connection_lost runs a loop turn after abort
            if not self._live:
                break
            await asyncio.sleep(0.01)

    def _open_done(self, task: asyncio.Task[None]) -> None:
        self._attempts_done += 1
        if self._attempts_done >= self.config.count:
            self._first_wave.set()
        self._changed.set()

    def lost(self, conn: _FloodConnection) -> None:
        self._live.discard(conn)
        self.stats["closed"] += 1
        self._changed.set()

    async def _keep_open(self) -> None:
        opens: set[asyncio.Task[None]] = set()
        try:
            attempted = 0
            while True:
                while len(self._live) + self._opening < self.config.count and len(opens) < self.config.concurrency:
                    if not self.config.reopen and attempted >= self.config.count:
                        break
                    attempted += 1
                    self._opening += 1  # until its connect returns (_open_one)
                    task = asyncio.get_running_loop().create_task(self._open_one())
                    opens.add(task)
                    task.add_done_callback(opens.discard)
                    task.add_done_callback(self._open_done)
                self._changed.clear()
                await self._changed.wait()
        finally:
            for task in opens:
                task.cancel()
            await asyncio.gather(*opens, return_exceptions=True)

    async def _open_one(self) -> None:
        cfg = self.config
        source = cfg.sources[self._next_source % len(cfg.sources)]
        self._next_source += 1
        identity = Identity.from_seed(self._rng.randbytes(32)) if cfg.kind == "handshaken" else None
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: _FloodConnection(self, source, identity), cfg.host, cfg.port, local_addr=(source, 0)
                )
        except (OSError, TimeoutError):
            self.stats["errors"] += 1
            await asyncio.sleep(0.01)  # the listener is gone or the ports are used up: do not spin
            return
        finally:
            self._opening -= 1
        self.stats["opened"] += 1
        if conn.gone:
            return
        if not self._running:
            conn.close()
            return
        self._live.add(conn)
        if cfg.kind == "handshaken":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.connect_timeout_s):
                    await conn.settled

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.ping_interval_s)
            token = self._rng.randbytes(PING_PAYLOAD_BYTES)
            for conn in list(self._live):
                conn.ping(token)


async def _main(args: argparse.Namespace) -> None:
    target = parse_maddr(args.target)
    flood = ConnFlood(
        FloodConfig(
            host=target.host,
            port=target.port,
            kind=args.kind,
            count=args.count,
            sources=tuple(s for s in args.sources.split(",") if s),
            ping_interval_s=args.ping_interval,
            reopen=not args.no_reopen,
            concurrency=args.concurrency,
            seed=args.seed,
        )
    )
    try:
        await flood.start()
        print("ready", json.dumps({**flood.stats, "live": flood.live()}), flush=True)
        while True:
            await asyncio.sleep(1.0)
            print("stats", json.dumps({**flood.stats, "live": flood.live()}), flush=True)
    finally:
        await flood.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="multiaddr of the listener")
    parser.add_argument("--kind", choices=KINDS, default="handshaken")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--sources", default="127.0.0.1", help="comma-separated local addresses to bind")
    parser.add_argument("--ping-interval", type=float, default=30.0, help="seconds between PINGs (handshaken)")
    parser.add_argument("--no-reopen", action="store_true", help="do not reopen connections that close")
    parser.add_argument("--concurrency", type=int, default=16, help="connections opening at once")
    parser.add_argument("--seed", type=int, default=0)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
