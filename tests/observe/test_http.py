"""The HTTP endpoints without training: the --http option, loopback by default and said so, 404 on unknown paths,
a clear error when the port is in use (in-process and from `swarm-node start`), the RPC latency counters and the
averaging round counts the metrics read, and the loss-curve and step-rate bookkeeping."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from swarm.averaging.stats import AveragingStats
from swarm.cli.node import main
from swarm.dht import DHT, DHTConfig
from swarm.errors import ConfigError
from swarm.local.events import HttpEvent, StoppedEvent, decode_event
from swarm.observe import HttpConfig, HttpServeError, NodeSource, Observer, parse_http_address
from swarm.observe.history import Curves, StepClock
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity
from swarm.p2p.latency import LATENCY_BUCKETS_S, CallLatency

DEADLINE_S = 10.0


def test_http_address_parsing() -> None:
    assert parse_http_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http_address("0.0.0.0:9") == ("0.0.0.0", 9)
    assert parse_http_address("[::1]:8080") == ("::1", 8080)
    assert parse_http_address("8080") == ("127.0.0.1", 8080)  # a bare port binds loopback
    assert parse_http_address(":0") == ("127.0.0.1", 0)
    for bad in ("localhost:8080", "127.0.0.1:http", "127.0.0.1:70000", "", "1.2.3.4:"):
        with pytest.raises(ConfigError, match="--http"):
            parse_http_address(bad)
    with pytest.raises(ConfigError, match=r"http\.host"):
        HttpConfig(host="example.org")
    assert HttpConfig().host == "127.0.0.1" and HttpConfig().loopback
    assert not HttpConfig(host="0.0.0.0").loopback


@pytest.fixture
async def dht_node() -> AsyncIterator[tuple[Transport, DHT]]:
    """A DHT-only node on loopback (no role): what `swarm-node start --role dht` runs."""
    identity = Identity.from_seed(b"\x31" * 32)
    transport = Transport(identity, TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=3.0))
    await transport.start()
    dht = DHT.create(DHTConfig(), identity=identity, transport=transport)
    await dht.start()
    try:
        yield transport, dht
    finally:
        await dht.shutdown()
        await transport.stop()


def _source(transport: Transport, dht: DHT) -> NodeSource:
    return NodeSource(transport=transport, dht=lambda: dht, role=lambda: None, expects_role=False)


async def test_serves_on_loopback_says_so_and_answers_404(
    dht_node: tuple[Transport, DHT], caplog: pytest.LogCaptureFixture
) -> None:
    transport, dht = dht_node
    observer = Observer(HttpConfig(refresh_s=0.1), _source(transport, dht))
    with caplog.at_level(logging.INFO, logger="swarm.observe.http"):
        await observer.start()
    try:
        assert observer.port and observer.url == f"http://127.0.0.1:{observer.port}/"
        assert "loopback only" in observer.describe() and "loopback only" in caplog.text
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as http:
            for path in ("/nope", "/static/nope.js", "/static/../http.py", "/api/nothing"):
                async with http.get(observer.url.rstrip("/") + path) as reply:
                    assert reply.status == 404, path
            async with http.get(observer.url) as reply:
                assert reply.status == 200 and "/static/app.js" in await reply.text()
            async with http.get(observer.url + "static/app.js") as reply:
                assert reply.status == 200 and "/api/status" in await reply.text()
            async with http.get(observer.url + "metrics") as reply:
                assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
                families = {f.name: f for f in text_string_to_metric_families(await reply.text())}
            assert families["swarm_node_info"].samples[0].labels["role"] == "dht"
            async with http.get(observer.url + "health") as reply:  # alone: no peer in its routing table
                body = await reply.json()
                assert reply.status == 503 and any("DHT" in r for r in body["reasons"]), body
    finally:
        await observer.stop()
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped: nothing listens any more
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as http:
            await http.get(observer.url)


async def test_a_wildcard_host_is_said_to_be_open(dht_node: tuple[Transport, DHT]) -> None:
    """Not started (tests bind loopback only): what it would say when serving every interface."""
    observer = Observer(HttpConfig(host="0.0.0.0", port=8080), _source(*dht_node))
    observer.port = 8080
    assert "to every machine" in observer.describe() and observer.url == "http://127.0.0.1:8080/"


async def test_a_port_in_use_is_a_clear_error(dht_node: tuple[Transport, DHT]) -> None:
    transport, dht = dht_node
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        observer = Observer(HttpConfig(port=port), _source(transport, dht))
        with pytest.raises(HttpServeError, match=rf"--http 127.0.0.1:{port}: cannot listen: .*in use.*another port"):
            await observer.start()
        await observer.stop()  # nothing was started: a no-op


def test_swarm_node_start_fails_at_once_on_a_port_in_use(tmp_path: Path) -> None:
    """`swarm-node start --http` on a port in use: one error line naming the address, exit code 1, before joining."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["start", "--role", "dht", "--data-dir", str(tmp_path), "--http", f"127.0.0.1:{port}"]
        args += ["--events-file", str(tmp_path / "events.jsonl"), "--log-level", "ERROR"]
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert f"error: --http 127.0.0.1:{port}: cannot listen" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    events = [decode_event(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert isinstance(events[-1], StoppedEvent) and "cannot listen" in (events[-1].error or "")
    assert not any(isinstance(e, HttpEvent) for e in events)


def test_call_latency_counts_per_method() -> None:
    latency = CallLatency()
    latency.observe("dht.ping", 0.003, ok=True)
    latency.observe("dht.ping", 0.2, ok=False)
    latency.observe("stage.forward", 100.0, ok=True)  # past the last bound: the overflow bucket
    snap = latency.snapshot()
    assert list(snap) == ["dht.ping", "stage.forward"]
    ping = snap["dht.ping"]
    assert ping.count == 2 and ping.errors == 1 and ping.sum_s == pytest.approx(0.203)
    assert (
        ping.bucket_counts[LATENCY_BUCKETS_S.index(0.005)] == 1
        and ping.bucket_counts[LATENCY_BUCKETS_S.index(0.25)] == 1
    )
    assert snap["stage.forward"].bucket_counts[-1] == 1
    latency.observe("dht.ping", 0.003, ok=True)
    assert ping.count == 2  # a snapshot is a copy


def test_averaging_stats_and_history() -> None:
    stats = AveragingStats()
    stats.record(group_size=3, with_others=True, lost_peers=1)
    stats.record(group_size=1, with_others=False, failed=True)
    assert (stats.rounds, stats.alone, stats.failures, stats.lost_peers) == (2, 1, 1, 1)
    assert stats.group_sizes == {3: 1, 1: 1} and stats.last_group_size == 1

    clock = StepClock(started=0.0)
    clock.observe(0, 0.0)
    clock.observe(0, 50.0)  # a long wait before training: not in the rate
    assert clock.age_s(60.0) == 60.0 and clock.steps_per_s() is None
    clock.observe(1, 100.0)
    clock.observe(3, 102.0)
    assert clock.age_s(103.0) == 1.0 and clock.steps_per_s() == pytest.approx(1.0)

    curves = Curves(max_steps=5, max_points=3)
    curves.add({1: 4.0, 2: 3.0}, {}, own=False)
    curves.add({2: 2.5, 3: 2.0}, {2: 2.8}, own=True)  # this node's own losses win
    curves.add({3: 9.0, 4: 1.5, 5: 1.4, 6: 1.3}, {}, own=False)  # the records only fill gaps; oldest dropped
    assert sorted(curves.train) == [2, 3, 4, 5, 6] and curves.train[3] == 2.0
    assert curves.points(curves.train) == [[2, 2.5], [3, 2.0], [6, 1.3]]  # thinned, the last point kept
    assert curves.points(curves.eval) == [[2, 2.8]]


async def test_health_turns_on_stale_dht_reads(dht_node: tuple[Transport, DHT]) -> None:
    """The watcher's clock is injected: a DHT read older than the stale limit is a reason, whatever it said."""
    transport, dht = dht_node
    now = [1000.0]
    observer = Observer(HttpConfig(refresh_s=1.0, dht_timeout_s=1.0), _source(transport, dht), clock=lambda: now[0])
    observer.watcher.dht_error = None
    observer.watcher.view_at = 1000.0
    assert observer.health().ok
    now[0] += 10.0
    reasons = observer.health().reasons
    assert reasons == ["cannot reach the DHT: no read of the run's records for 10s"]
    await asyncio.sleep(0)
