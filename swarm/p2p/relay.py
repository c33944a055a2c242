"""The relay service of a public node: reservations, and circuits spliced between a dialler and a reserved peer.

A peer behind NAT reserves (``relay.reserve``) and keeps its connection to the relay open; its circuit address
is ``/ip4/R/tcp/P/p2p/<relay>/p2p-circuit/p2p/<peer>``. A dialler opens a TCP connection to the relay and asks
for the peer (``circuit.py``); the relay calls the peer (``relay.incoming``) over its reservation connection, the
peer connects back with the token, and the relay splices the two sockets (``splice.py``). The two ends then run
Noise XX end to end: the relay forwards ciphertext only. Everything is bounded (RelayConfig): reservations
(count, expiry), circuits (in all, per peer), bytes and duration per circuit, bandwidth over all circuits; a
request over a limit is refused with code ``relay_limit``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from swarm.p2p.circuit import (
    NO_RESERVATION,
    RELAY_LIMIT,
    RELAY_UNAVAILABLE,
    TOKEN_BYTES,
    CircuitRecord,
    RelayLimitError,
)
from swarm.p2p.connection import Connection
from swarm.p2p.identity import PeerID
from swarm.p2p.reach_messages import IncomingReply, IncomingRequest, ReserveReply, ReserveRequest
from swarm.p2p.refusal import encode_refusal
from swarm.p2p.rpc import RpcContext
from swarm.p2p.splice import Splice, TokenBucket
from swarm.p2p.transport import Transport
from swarm.configs import Config, setting
from swarm.errors import SwarmError

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20


class RelayConfig(Config, section="relay"):
    """The limits of a node's relay service (offered only while the node is publicly reachable)."""

    enabled: bool = setting(default=True, doc="Offer the relay service when this node is publicly reachable.")
    max_reservations: int = setting(default=128, ge=0, le=100_000, doc="Most peers holding a reservation here.")
    reservation_ttl_s: float = setting(default=90.0, gt=0, le=86400, doc="A reservation expires unless renewed.")
    max_circuits: int = setting(default=64, ge=0, le=100_000, doc="Most circuits open at once.")
    max_circuits_per_peer: int = setting(default=16, ge=1, le=100_000, doc="Most circuits to one reserved peer.")
    max_circuit_bytes: int = setting(default=4 * GiB, ge=1, doc="A circuit is closed after this many bytes relayed.")
    max_circuit_duration_s: float = setting(default=3600.0, gt=0, le=86400 * 7, doc="A circuit is closed after this.")
    max_bandwidth_bytes_per_s: int = setting(
        default=64 * MiB, ge=1024, doc="Bytes per second relayed over all circuits together."
    )
    setup_timeout_s: float = setting(default=5.0, gt=0, le=600, doc="Deadline of the reserved peer's answer.")


class RelayService:
    """Serves ``relay.reserve`` and the circuit requests of a transport's listener (see the module docstring).

    ``accepting()`` says whether to serve now (a node offers relaying only while it is publicly reachable);
    ``tap`` sees every relayed buffer (tests check that no plaintext crosses the relay).
    """

    def __init__(
        self,
        config: RelayConfig,
        transport: Transport,
        *,
        accepting: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self._accepting = accepting
        self._clock = clock
        self._tap = tap
        self._me = transport.peer_id.short()
        self.reservations: dict[PeerID, float] = {}  # peer -> expiry (clock)
        self.circuits: dict[Splice, PeerID] = {}
        self._tokens: dict[bytes, asyncio.Future[Connection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._bucket = TokenBucket(config.max_bandwidth_bytes_per_s, max(MiB, config.max_bandwidth_bytes_per_s / 4))
        self.bytes_relayed = 0  # over every closed circuit; see `total_bytes_relayed`

    @property
    def total_bytes_relayed(self) -> int:
        return self.bytes_relayed + sum(s.bytes_relayed for s in self.circuits)

    def start(self) -> None:
        self.transport.register("relay.reserve", ReserveRequest, self.rpc_reserve)
        self.transport.set_circuit_handler(self.on_circuit)

    async def stop(self) -> None:
        """Stop serving: unregister, close every circuit, cancel the circuits being set up."""
        self.transport.unregister("relay.reserve")
        self.transport.set_circuit_handler(None)
        for splice in list(self.circuits):
            splice.close("the relay is stopping")
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.setup_timeout_s)
        self.reservations.clear()

    def _serving(self) -> bool:
        return self.config.enabled and self._accepting()

    def _expire(self) -> None:
        now = self._clock()
        for peer in [p for p, expiry in self.reservations.items() if expiry <= now]:
            del self.reservations[peer]
            log.debug("%s: the relay reservation of %s expired", self._me, peer.short())

    async def rpc_reserve(self, ctx: RpcContext, req: ReserveRequest) -> ReserveReply:
        self._expire()
        if not self._serving():  # not public (yet): an answer, not an error (every relayed node asks at start)
            return ReserveReply(ttl_s=0.0, reservations=len(self.reservations), refused=RELAY_UNAVAILABLE)
        peer = ctx.peer_id
        if peer not in self.reservations and len(self.reservations) >= self.config.max_reservations:
            raise RelayLimitError(
                f"relay {self._me} holds max_reservations={self.config.max_reservations}; use another relay"
            )
        if peer not in self.reservations:
            log.info("%s: relay reservation for %s", self._me, peer.short())
        self.reservations[peer] = self._clock() + self.config.reservation_ttl_s
        return ReserveReply(ttl_s=self.config.reservation_ttl_s, reservations=len(self.reservations))

    # -- circuits --

    def on_circuit(self, conn: Connection, request: CircuitRecord) -> None:
        """The transport's listener got a circuit record in place of a handshake (see circuit.py)."""
        if request.op == "accept":
            future = self._tokens.pop(request.token, None)
            if future is None or future.done():
                conn.close("a circuit accept with an unknown or late token", warn=True)
            else:
                future.set_result(conn)
        elif request.op == "connect" and request.target is not None:
            task = asyncio.get_running_loop().create_task(self._connect(conn, request.target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            conn.close(f"an unexpected circuit record ({request.op})", warn=True)

    def _refusal(self, target: PeerID) -> tuple[str, str] | None:
        """Why a circuit to ``target`` cannot open now: (code, message), or None."""
        self._expire()
        if not self._serving():
            return RELAY_UNAVAILABLE, f"{self._me} offers no relay service now"
        if target not in self.reservations or target not in self.transport.connected_peers():
            self.reservations.pop(target, None)
            return NO_RESERVATION, f"{target.short()} holds no reservation at relay {self._me}; try its other addresses"
        if len(self.circuits) >= self.config.max_circuits:
            return RELAY_LIMIT, f"relay {self._me} has max_circuits={self.config.max_circuits} open"
        if sum(1 for p in self.circuits.values() if p == target) >= self.config.max_circuits_per_peer:
            return RELAY_LIMIT, f"{target.short()} has max_circuits_per_peer={self.config.max_circuits_per_peer} here"
        return None

    async def _connect(self, conn: Connection, target: PeerID) -> None:
        refusal = self._refusal(target)
        if refusal is not None:
            self._refuse(conn, *refusal)
            return
        token = os.urandom(TOKEN_BYTES)
        future: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self._tokens[token] = future
        try:
            async with asyncio.timeout(self.config.setup_timeout_s):
                await self.transport.call(
                    target,
                    "relay.incoming",
                    IncomingRequest(token=token),
                    IncomingReply,
                    timeout_s=self.config.setup_timeout_s,
                )
                back = await future
        except (SwarmError, TimeoutError) as e:
            self._refuse(conn, NO_RESERVATION, f"{target.short()} did not connect back to relay {self._me}: {e}")
            return
        finally:
            self._tokens.pop(token, None)
        refusal = self._refusal(target)  # limits again: other circuits may have opened meanwhile
        if refusal is not None or conn.closed or back.closed:
            back.close("circuit not opened", warn=False)
            self._refuse(conn, *(refusal or (NO_RESERVATION, "the dialler went away")))
            return
        self._splice(conn, back, target)

    def _splice(self, conn: Connection, back: Connection, target: PeerID) -> None:
        conn.write_record(CircuitRecord(op="ok").encode())
        name = f"{conn.remote_host}:{conn.remote_port} -> {target.short()}"
        a, b = conn.detach("spliced into a circuit"), back.detach("spliced into a circuit")
        if a[0] is None or b[0] is None:
            for t in (a[0], b[0]):
                if t is not None:
                    t.close()
            return
        cfg = self.config
        splice = Splice(
            name=name,
            max_bytes=cfg.max_circuit_bytes,
            max_duration_s=cfg.max_circuit_duration_s,
            bucket=self._bucket,
            on_close=self._closed,
            tap=self._tap,
        )
        self.circuits[splice] = target
        splice.start((a[0], a[1]), (b[0], b[1]))
        log.debug("%s: circuit %s open (%d in all)", self._me, name, len(self.circuits))

    def _closed(self, splice: Splice, reason: str) -> None:
        if self.circuits.pop(splice, None) is not None:
            self.bytes_relayed += splice.bytes_relayed

    def _refuse(self, conn: Connection, code: str, message: str) -> None:
        log.info("%s: refused a circuit (%s): %s", self._me, code, message)
        conn.write_record(encode_refusal(message, code))
        conn.close(f"circuit refused ({code})", warn=False)

    def stats(self) -> dict[str, Any]:
        return {
            "reservations": len(self.reservations),
            "circuits": len(self.circuits),
            "bytes_relayed": self.total_bytes_relayed,
        }
