"""Dialling: where peers listen (the address book) and how a transport reaches one.

A call to a peer reuses its open connection; otherwise one dial per peer (or per address, for a multiaddr
without ``/p2p/``) is in flight at a time and every concurrent caller awaits it. A dial tries the peer's known
addresses newest first, each within ``connect_timeout_s`` + ``handshake_timeout_s``, inside a slot of the
connection budget (OverloadedError when none is free). A circuit address (``.../p2p-circuit/p2p/<peer>``) is
dialled at its relay, which opens the circuit (``circuit.py``) before the end-to-end handshake; the handshake
must prove the target's PeerID, so a relay cannot pose as the peer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from typing import Any


from swarm.p2p.circuit import CircuitRecord, check_circuit_answer
from swarm.p2p.endpoint import Endpoint
from swarm.p2p.connection import Connection
from swarm.p2p.identity import PeerID
from swarm.p2p.maddr import PeerAddress, parse_maddr
from swarm.errors import HandshakeError, OverloadedError, SwarmError, TransportError

PeerLike = PeerID | PeerAddress | str
MAX_ADDRESSES_PER_PEER = 16


class Dialer:
    """The outbound side of one transport: its address book and its dials in flight."""

    def __init__(self, endpoint: Endpoint, *, make_connection: Callable[[], Connection]) -> None:
        self._endpoint = endpoint
        self.identity = endpoint.identity
        self.config = endpoint.config
        self._make_connection = make_connection  # an outbound (initiator) Connection
        self._addresses: dict[PeerID, list[PeerAddress]] = {}
        self._dials: dict[Any, asyncio.Task[Connection]] = {}

    @property
    def tasks(self) -> list[asyncio.Task[Connection]]:
        """The dials in flight (the transport cancels them when it stops)."""
        return list(self._dials.values())

    def add_addresses(self, peer_id: PeerID, addrs: Iterable[PeerAddress]) -> None:
        """Remember where ``peer_id`` listens (used when dialling it by PeerID); newest first."""
        known = self._addresses.setdefault(peer_id, [])
        for addr in addrs:
            addr = addr.with_peer_id(peer_id)
            if addr in known:
                known.remove(addr)
            known.insert(0, addr)
        del known[MAX_ADDRESSES_PER_PEER:]

    def addresses(self, peer_id: PeerID) -> tuple[PeerAddress, ...]:
        return tuple(self._addresses.get(peer_id, ()))

    def direct_peers(self) -> list[PeerID]:
        """Peers with at least one direct (not circuit) address."""
        return [p for p, addrs in self._addresses.items() if any(a.relay is None for a in addrs)]

    async def connection(self, peer: PeerLike) -> Connection:
        """The open connection to ``peer``, dialling it if there is none."""
        if isinstance(peer, str):
            peer = parse_maddr(peer)
        peer_id: PeerID | None
        addrs: tuple[PeerAddress, ...]
        if isinstance(peer, PeerID):
            peer_id, addrs = peer, self.addresses(peer)
            if not addrs and self._endpoint.table.open_connection(peer) is None:
                raise TransportError(f"no known address for peer {peer.short()}; add one with add_addresses()")
        else:
            peer_id, addrs = peer.peer_id, (peer,)
        if peer_id is not None and (conn := self._endpoint.table.open_connection(peer_id)) is not None:
            return conn
        key: Any = peer_id if peer_id is not None else (addrs[0].host, addrs[0].port)
        task = self._dials.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._dial_any(peer_id, addrs))
            self._dials[key] = task
            task.add_done_callback(lambda t: self._dial_done(key, t))
        return await asyncio.shield(task)

    def _dial_done(self, key: Any, task: asyncio.Task[Connection]) -> None:
        if self._dials.get(key) is task:
            del self._dials[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter re-raises it

    async def _dial_any(self, peer_id: PeerID | None, addrs: Iterable[PeerAddress]) -> Connection:
        errors: list[SwarmError] = []
        for addr in addrs:
            try:
                return await self._dial(addr)
            except (TransportError, HandshakeError) as e:
                errors.append(e)
        if len(errors) == 1 or all(isinstance(e, OverloadedError) for e in errors):
            raise errors[0]
        who = peer_id.short() if peer_id is not None else "the peer"
        raise TransportError(f"cannot reach {who} at any known address: " + "; ".join(map(str, errors)))

    async def _dial(self, addr: PeerAddress) -> Connection:
        with self._endpoint.admission.dial_slot():  # OverloadedError if every slot is taken and busy
            conn = await self._dial_and_handshake(addr)
            self._endpoint.admission.dialled(conn)
        self.add_addresses(conn.peer_id, [addr])  # type: ignore[arg-type]  # the handshake set it
        self._endpoint.establish(conn)
        conn.begin_frames()
        return conn

    async def _dial_and_handshake(self, addr: PeerAddress) -> Connection:
        family = socket.AF_INET6 if addr.protocol in ("ip6", "dns6") else socket.AF_INET
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                _, conn = await loop.create_connection(self._make_connection, addr.host, addr.port, family=family)
        except (OSError, TimeoutError) as e:
            reason = e or "timed out"
            raise TransportError(f"cannot connect to {addr}: {reason}; check that the peer runs there") from None
        self._endpoint.table.all.add(conn)
        if addr.relay is not None:
            conn.relayed = True
            await self._open_circuit(conn, addr)
        try:
            async with asyncio.timeout(self.config.handshake_timeout_s):
                peer_id = await conn.handshake(self.identity, self._endpoint.static_key, addr.peer_id)
        except TimeoutError:
            conn.close("handshake timed out", warn=True)
            raise HandshakeError(
                f"handshake with {addr} did not finish within {self.config.handshake_timeout_s}s; is it a swarm node?"
            ) from None
        except SwarmError as e:  # a refusal is the peer's honest answer, not a fault: no warning
            conn.close(f"handshake failed: {e}", warn=not isinstance(e, OverloadedError))
            raise
        if peer_id == self.identity.peer_id:
            conn.close("dialled ourselves", warn=False)
            raise TransportError(f"{addr} is this node itself; leave it out of the peers to dial")
        if conn.closed:
            raise TransportError(f"connection to {addr} closed right after the handshake: {conn.close_reason}")
        return conn

    async def _open_circuit(self, conn: Connection, addr: PeerAddress) -> None:
        """Ask the relay of circuit address ``addr`` for its peer; raise the relay's refusal (RelayLimitError,
        CircuitRefusedError) or a TransportError if it does not answer within ``connect_timeout_s``."""
        if addr.peer_id is None:
            conn.close("a circuit address without the peer", warn=False)
            raise TransportError(f"circuit address {addr} must end with /p2p/<PeerID> of the peer to reach")
        where = f"{addr.host}:{addr.port}"
        conn.write_record(CircuitRecord(op="connect", target=addr.peer_id).encode())
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                check_circuit_answer(await conn.read_handshake_record(), where)
        except TimeoutError:
            conn.close("circuit not opened in time", warn=False)
            raise TransportError(f"relay {where} did not open a circuit to {addr.peer_id.short()} in time") from None
        except SwarmError:
            conn.close("circuit refused", warn=False)
            raise

    async def probe(self, addr: PeerAddress) -> None:
        """Dial ``addr`` on a fresh connection (never reusing one), prove its PeerID, then close it: the
        AutoNAT dial-back (``autonat.py``). TransportError / HandshakeError when it cannot be reached."""
        with self._endpoint.admission.dial_slot():
            conn = await self._dial_and_handshake(addr)
        try:  # one PING answered: the peer finished its side of the handshake (closing earlier would look
            conn.begin_frames()  # like a broken handshake there)
            await conn.ping(self.config.handshake_timeout_s)
        finally:
            conn.close("dial-back done", warn=False)
