"""Connection budgets (docs/transport.md, "Connection budgets"): floods of free identities or silent sockets do not
lock a legitimate peer out, refusals are honest and their log lines rate limited, protected peers stay.

The attackers bind 127.0.0.2 ... as their source addresses (Linux routes all of 127.0.0.0/8 to loopback); the
legitimate peer dials from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

from swarm.errors import OverloadedError, TransportError
from swarm.p2p import RpcContext, Transport
from swarm.p2p.connlog import FULL_LINES_PER_INTERVAL, ConnectionLog
from swarm.p2p.maddr import parse_maddr
from swarm.testing.conn_flood import ConnFlood, FloodConfig
from tests.transport.conftest import Echo, MakeTransport

DEADLINE_S = 20.0  # for each wait; the figures these tests see on a busy 2-core machine are well below
LEGIT_DEADLINE_S = 10.0  # the legitimate peer must be served within this, flood or not
LOG_INTERVAL_S = 1.0


class CountingHandler(logging.Handler):
    """Counts the WARNING records of the transport's loggers (records, not text files)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def summaries(self) -> list[str]:
        return [m for r in self.records if "refused, evicted or closed" in (m := r.getMessage())]


@pytest.fixture
def warnings_seen() -> Iterator[CountingHandler]:
    handler = CountingHandler()
    logger = logging.getLogger("swarm.p2p")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def _echo(ctx: RpcContext, request: Echo) -> Echo:
    return Echo(number=request.number + 1)


async def _server(make_transport: MakeTransport, **overrides: object) -> Transport:
    overrides.setdefault("connection_log_interval_s", LOG_INTERVAL_S)
    server = await make_transport("server", **overrides)
    server.register("test.echo", Echo, _echo)
    return server


def _flood(server: Transport, kind: str, count: int, sources: range, **kwargs: object) -> ConnFlood:
    addr = parse_maddr(server.listen_maddrs[0])
    return ConnFlood(
        FloodConfig(
            host=addr.host,
            port=addr.port,
            kind=kind,
            count=count,
            sources=tuple(f"127.0.0.{i}" for i in sources),
            **kwargs,  # type: ignore[arg-type]
        )
    )


async def _time_to_serve(client: Transport, server: Transport) -> float:
    """Seconds until a call from ``client`` to ``server`` succeeds (retrying refusals, as a real peer does)."""
    start = time.monotonic()
    async with asyncio.timeout(LEGIT_DEADLINE_S):
        while True:
            try:
                assert (await client.call(server.listen_maddrs[0], "test.echo", Echo(number=1), Echo)).number == 2
                return time.monotonic() - start
            except TransportError:  # refused or closed: try again, as a real peer would
                await asyncio.sleep(0.05)


def _max_lines(elapsed_s: float) -> int:
    """What the rate limit allows: per interval a few full lines and one summary."""
    return (FULL_LINES_PER_INTERVAL + 1) * (int(elapsed_s / LOG_INTERVAL_S) + 2)


async def test_512_idle_authenticated_identities_do_not_lock_out_a_peer(
    make_transport: MakeTransport, warnings_seen: CountingHandler
) -> None:
    server = await _server(make_transport, idle_timeout_s=60.0)
    flood = _flood(server, "handshaken", 512, range(2, 10), ping_interval_s=0.5, reopen=False, seed=1)
    start = time.monotonic()
    try:
        await flood.start()
        assert flood.stats["handshakes"] == 512  # every attacker completed a real handshake
        held = flood.live()
        reserved = server.config.reserved_connections
        assert held == server.config.max_connections - reserved  # the attack holds every unprotected slot
        await asyncio.sleep(1.2)  # PINGs flow on every attacking connection
        client = await make_transport("legit")
        served_s = await _time_to_serve(client, server)
        assert flood.live() >= held - 2  # served by evicting an idle attacker, not because the attack stopped
    finally:
        await flood.stop()
    elapsed_s = time.monotonic() - start
    print(f"legit peer served after {served_s:.3f}s; {len(warnings_seen.records)} warnings in {elapsed_s:.1f}s")
    assert len(warnings_seen.records) <= _max_lines(elapsed_s)
    assert warnings_seen.summaries()  # the 64 evictions of the first wave were summarized, not logged one by one


async def test_600_silent_connections_reopened_at_once_do_not_lock_out_a_peer(
    make_transport: MakeTransport, warnings_seen: CountingHandler
) -> None:
    server = await _server(make_transport)
    flood = _flood(server, "silent", 600, range(2, 12), reopen=True, concurrency=64)
    start = time.monotonic()
    try:
        await flood.start()
        client = await make_transport("legit")
        served_s = await _time_to_serve(client, server)
        await asyncio.sleep(2 * LOG_INTERVAL_S)  # the churn goes on: two more intervals of it
        assert flood.stats["opened"] > 600  # the attack really churned: closed connections were reopened
        assert flood.stats["refusals"] > 0  # those turned away were told why
        counts = server.connection_counts()
        assert counts["pending"] <= server.config.max_pending_connections
    finally:
        await flood.stop()
    elapsed_s = time.monotonic() - start
    lines = len(warnings_seen.records)
    print(f"legit peer served after {served_s:.3f}s; {flood.stats}; {lines} warnings in {elapsed_s:.1f}s")
    assert lines <= _max_lines(elapsed_s)
    assert warnings_seen.summaries()


async def test_refused_dialler_is_told_the_peer_is_at_its_connection_limit(make_transport: MakeTransport) -> None:
    server = await _server(make_transport, max_pending_per_ip=1)
    addr = parse_maddr(server.listen_maddrs[0])
    _, silent = await asyncio.open_connection(addr.host, addr.port, local_addr=("127.0.0.1", 0))
    try:
        async with asyncio.timeout(DEADLINE_S):
            while server.connection_counts()["pending"] < 1:  # the silent socket holds 127.0.0.1's one slot
                await asyncio.sleep(0.01)
            client = await make_transport("legit")
            with pytest.raises(OverloadedError, match="the peer is at its connection limit") as refused:
                await client.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
            assert "max_pending_per_ip=1" in str(refused.value)
            assert "closed during the handshake" not in str(refused.value)
    finally:
        silent.close()
    async with asyncio.timeout(DEADLINE_S):  # the slot is free again once the silent socket is gone
        while server.connection_counts()["pending"]:
            await asyncio.sleep(0.01)
        assert (await client.call(server.listen_maddrs[0], "test.echo", Echo(number=1), Echo)).number == 2


async def test_refusal_after_the_handshake_and_the_reserve_for_protected_peers(make_transport: MakeTransport) -> None:
    server = await _server(make_transport, max_connections=2, protected_reserve_fraction=0.5)
    release = asyncio.Event()

    async def hold(ctx: RpcContext, request: Echo) -> Echo:
        await release.wait()
        return request

    server.register("test.hold", Echo, hold)
    busy, stranger, needed = [await make_transport(name) for name in ("busy", "stranger", "needed")]
    server.protect(needed.peer_id, "test")
    async with asyncio.timeout(DEADLINE_S):
        held = asyncio.ensure_future(busy.call(server.listen_maddrs[0], "test.hold", Echo(), Echo))
        while server.connection_counts()["established"] < 1:
            await asyncio.sleep(0.01)
        # one slot of two is reserved for protected peers and the other is busy: the stranger learns why
        with pytest.raises(OverloadedError, match="the peer is at its connection limit") as refused:
            await stranger.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
        assert "reserved for protected peers" in str(refused.value)  # told after its handshake, on stream 0
        assert (await needed.call(server.listen_maddrs[0], "test.echo", Echo(number=7), Echo)).number == 8
        release.set()
        await held


async def test_protected_peers_are_never_evicted(make_transport: MakeTransport) -> None:
    server = await _server(make_transport, max_connections=3, protected_reserve_fraction=0.0)
    needed = await make_transport("needed")
    server.protect(needed.peer_id, "test")
    lost: list[str] = []
    needed.on_peer_disconnected(lambda peer, addr: lost.append("needed"))
    async with asyncio.timeout(DEADLINE_S):
        await needed.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)  # the oldest activity of all
        first = await make_transport("first")
        first_lost = asyncio.Event()
        first.on_peer_disconnected(lambda peer, addr: first_lost.set())
        await first.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
        for i in range(6):  # each newcomer evicts the least recently used unprotected connection
            newcomer = await make_transport(f"newcomer-{i}")
            await newcomer.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
            assert server.connection_counts()["established"] <= 3
        await first_lost.wait()  # an unprotected peer was evicted ...
        assert lost == [] and needed.peer_id in server.connected_peers()  # ... the protected one never
        server.unprotect(needed.peer_id, "test")  # without protection it is the least recently used: it goes
        gone = asyncio.Event()
        needed.on_peer_disconnected(lambda peer, addr: gone.set())
        await (await make_transport("last")).call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
        await gone.wait()


async def test_keepalive_pings_are_not_activity(make_transport: MakeTransport) -> None:
    server = await _server(make_transport, idle_timeout_s=1.0)
    pinger, caller = await make_transport("pinger"), await make_transport("caller")
    closed = asyncio.Event()
    pinger.on_peer_disconnected(lambda peer, addr: closed.set())
    caller_lost: list[float] = []
    caller.on_peer_disconnected(lambda peer, addr: caller_lost.append(time.monotonic()))
    async with asyncio.timeout(DEADLINE_S):
        start = time.monotonic()  # before the handshake, the pinger's last activity
        await pinger.connect(server.listen_maddrs[0])
        await caller.call(server.listen_maddrs[0], "test.echo", Echo(), Echo)
        while not closed.is_set():  # PING every 0.2 s: the server still closes the connection as idle
            await pinger.ping(server.peer_id)
            await caller.call(server.peer_id, "test.echo", Echo(), Echo)  # an RPC every 0.2 s is activity
            await asyncio.sleep(0.2)
        assert 1.0 <= time.monotonic() - start < 4.0
        assert caller_lost == []


async def test_per_source_caps(make_transport: MakeTransport) -> None:
    server = await _server(make_transport, max_connections_per_ip=4, max_pending_per_ip=8)
    crowd = _flood(server, "handshaken", 10, range(2, 3), reopen=False, concurrency=1, seed=2)
    other = _flood(server, "handshaken", 3, range(3, 4), reopen=False, seed=3)
    silent = _flood(server, "silent", 20, range(4, 5), reopen=False, concurrency=20)
    try:
        await crowd.start()
        await other.start()
        assert crowd.live("127.0.0.2") == 4  # the newest four: each newcomer evicted the oldest of its source
        assert other.live("127.0.0.3") == 3  # another source is not affected
        await silent.start()
        assert silent.stats["refusals"] >= 12  # over 8 handshakes in progress from one source: refused
        assert server.connection_counts()["pending"] <= 8
        client = await make_transport("legit")
        await _time_to_serve(client, server)
    finally:
        for flood in (crowd, other, silent):
            await flood.stop()


def test_connection_log_rate_limit() -> None:
    now = [0.0]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("tests.connlog")
    logger.propagate = False
    logger.addHandler(Collect())
    clog = ConnectionLog(logger, "me", interval_s=10.0, clock=lambda: now[0])
    for i in range(1000):  # 1000 refusals within 5 s
        now[0] = i * 0.005
        clog.warning("refused (max_pending_per_ip)", f"10.0.0.{i % 7}", "me: refused %d", i)
    assert records == [f"me: refused {i}" for i in range(FULL_LINES_PER_INTERVAL)]
    now[0] = 10.0
    clog.flush_if_due()
    assert len(records) == FULL_LINES_PER_INTERVAL + 1
    summary = records[-1]
    assert summary.startswith(f"me: refused, evicted or closed {1000 - FULL_LINES_PER_INTERVAL} connections")
    assert "997 refused (max_pending_per_ip)" in summary and "10.0.0.0 x" in summary and "2 more" in summary
    clog.flush_if_due()  # nothing new: no line
    now[0] = 25.0
    clog.flush_if_due()
    assert len(records) == FULL_LINES_PER_INTERVAL + 1
