"""Listening: the sockets a transport accepts connections on, and the admission of each inbound connection.

An accepted connection first needs a slot of the pending budget (``Admission.accept``), then finishes its
handshake within ``handshake_timeout_s``, then needs a slot of the established budget (``Admission.establish``)
before its frames are read; at each step a connection over the budget is evicted or refused honestly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable


from swarm.p2p.circuit import CircuitRequest
from swarm.p2p.endpoint import Endpoint
from swarm.p2p.connection import Connection
from swarm.p2p.maddr import format_maddr, parse_maddr
from swarm.errors import ConfigError, SwarmError


class Listener:
    """The inbound side of one transport: its listening sockets and the handshakes of accepted connections."""

    def __init__(self, endpoint: Endpoint, *, make_connection: Callable[[], Connection]) -> None:
        self._endpoint = endpoint
        self.identity = endpoint.identity
        self.config = endpoint.config
        self._make_connection = make_connection  # an inbound (responder) Connection
        self._servers: list[asyncio.Server] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The inbound handshakes in progress (the transport cancels them when it stops)."""
        return list(self._handshakes)

    async def listen(self, listen_maddrs: tuple[str, ...]) -> list[str]:
        """Listen on every multiaddr; the multiaddrs with the real ports and ``/p2p/<PeerID>``. Sockets opened
        before a failure stay open: the caller closes them (``close``)."""
        loop = asyncio.get_running_loop()
        maddrs = []
        for text in listen_maddrs:
            addr = parse_maddr(text)
            family = socket.AF_INET6 if addr.protocol in ("ip6", "dns6") else socket.AF_INET
            try:
                server = await loop.create_server(self._make_connection, addr.host, addr.port, family=family)
            except OSError as e:
                raise ConfigError(f"listen_maddrs: cannot listen on {text}: {e.strerror}; pick another port") from None
            self._servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                maddrs.append(format_maddr(str(host), int(port), self.identity.peer_id))
        return maddrs

    def accepted(self, conn: Connection) -> None:
        """A connection was accepted: start its handshake, within the pending budget."""
        if not self._endpoint.admission.accept(conn):
            return
        self._endpoint.table.all.add(conn)
        task = asyncio.get_running_loop().create_task(self._handshake(conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: Connection) -> None:
        try:
            async with asyncio.timeout(self.config.handshake_timeout_s):
                await conn.handshake(self.identity, self._endpoint.static_key, None)
        except TimeoutError:
            conn.close(
                f"handshake not finished within handshake_timeout_s={self.config.handshake_timeout_s}s", warn=True
            )
            return
        except CircuitRequest as request:  # not a handshake: a circuit for the relay service (relay.py)
            self._endpoint.on_circuit(conn, request.request)
            return
        except SwarmError as e:
            conn.close(f"handshake failed: {e}", warn=True)
            return
        if not self._endpoint.admission.establish(conn):
            return
        self._endpoint.establish(conn)
        conn.begin_frames()

    def close(self) -> None:
        """Stop accepting connections (the sockets close; ``wait_closed`` waits for them)."""
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        """Wait (each socket within ``write_timeout_s``) until the closed sockets are gone."""
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.write_timeout_s):
                    await server.wait_closed()
        self._servers.clear()
