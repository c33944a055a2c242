"""/metrics and /health of nodes in an in-process training swarm (the real role, transport and DHT):

- /metrics parses with prometheus_client's text parser, holds every family of `METRIC_NAMES`, and its values move
  as training runs (step, samples, bytes per RPC family, RPC latencies, averaging rounds, the loss);
- /health of a stage-1 node answers 200, turns 503 ("alone in its stage") when its stage peer stops, and 200 again
  once a new peer serves the stage;
- /api/status shows the run's stages with their peers, and the loss curve;
- an attestation and verdicts published for window 0 (by a peer standing for an orchestrator and a validator) show
  in /metrics (the node's reward share, the verdicts, the flagged peer) and in /api/status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm.dht import DHT, DHTConfig
from swarm.observe import HttpConfig, NodeSource, Observer
from swarm.observe.metrics import METRIC_NAMES
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity, PeerID
from swarm.run.config import RunConfig
from swarm.training.schemas import with_run_schemas
from swarm.verification.attestation import GENESIS_DIGEST, build_attestation, publish_attestation
from swarm.verification.rewards import RewardOutcome
from swarm.verification.verdicts import VerdictBatch, publish_verdicts, sign_verdict
from tests.training.swarm_harness import LiveNode, Swarm, small_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FAST_HTTP = HttpConfig(refresh_s=0.2, dht_timeout_s=3.0, reach_interval_s=1.0, stall_s=60.0)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def observe(node: LiveNode) -> Observer:
    source = NodeSource(transport=node.transport, dht=lambda: node.dht, role=lambda: node.trainer)
    return Observer(FAST_HTTP, source)


async def scrape(http: aiohttp.ClientSession, observer: Observer) -> tuple[set[str], Samples]:
    async with http.get(observer.url + "metrics") as reply:
        assert reply.status == 200
        text = await reply.text()
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as reply:
        return reply.status, await reply.json()


async def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll the coroutine function ``check`` until it returns something truthy."""
    try:
        async with asyncio.timeout(timeout_s):
            while not (found := await check()):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}") from None
    return found


async def test_metrics_move_and_health_follows_the_stage_peers() -> None:
    swarm = Swarm(small_run())
    observers: list[Observer] = []
    try:
        driver = await swarm.add(seed=40, stage=0)
        server = await swarm.add(seed=41, stage=1)
        peer = await swarm.add(seed=42, stage=1)
        observers = [observe(driver), observe(server)]
        for observer in observers:
            await observer.start()
        at_driver, at_server = observers
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await swarm.wait_step([server, peer], 1, timeout_s=60)
            names, first = await scrape(http, at_server)
            assert set(METRIC_NAMES) <= names, set(METRIC_NAMES) - names
            _, driver_first = await scrape(http, at_driver)
            await swarm.wait_step([server, peer], 3, timeout_s=60)
            _, later = await scrape(http, at_server)
            _, driver_later = await scrape(http, at_driver)
            assert total(later, "swarm_step") >= total(first, "swarm_step") + 2
            assert total(later, "swarm_served_stage") == 1 and total(driver_later, "swarm_served_stage") == 0
            assert total(later, "swarm_samples_served_total") > total(first, "swarm_samples_served_total")
            assert total(driver_later, "swarm_samples_driven_total") > total(driver_first, "swarm_samples_driven_total")
            for family in ("stage", "dht", "avg"):
                assert total(later, "swarm_rpc_sent_bytes_total", family=family) > 0, family
            assert total(later, "swarm_rpc_received_bytes_total") > total(first, "swarm_rpc_received_bytes_total")
            calls = "swarm_rpc_latency_seconds_count"
            assert total(later, calls, method="dht.find_value") > total(first, calls, method="dht.find_value")
            assert total(later, "swarm_averaging_rounds_total") >= total(first, "swarm_averaging_rounds_total") + 2
            assert total(later, "swarm_averaging_group_size_bucket", le="2") >= 2  # rounds of the two stage-1 peers
            assert total(later, "swarm_stage_peers", stage="1") == 2
            assert 0 < total(driver_later, "swarm_training_loss") < 20
            assert total(later, "swarm_healthy") == 1

            status, body = await get_json(http, at_server.url + "api/status")
            assert status == 200 and [len(s["peers"]) for s in body["stages"]] == [1, 2]
            assert len(body["loss_curve"]) >= 1 and body["node"]["stage"] == 1

            async def health(expected: int) -> Any:
                code, report = await get_json(http, at_server.url + "health")
                return report if code == expected else None

            report = await wait_until(lambda: health(200), 20, "/health 200 with both stage-1 peers up")
            assert report["stage"] == 1 and report["reasons"] == []
            await peer.shutdown()  # its stage record expires within 2 x record_period_s
            report = await wait_until(lambda: health(503), 30, "/health 503 once the stage peer is gone")
            assert any(r.startswith("alone in its stage") for r in report["reasons"]), report
            await swarm.add(seed=43, stage=1)
            report = await wait_until(lambda: health(200), 40, "/health 200 again once a new peer serves stage 1")
            assert report["status"] == "ok"

            await publish_window_zero(swarm, server.transport.peer_id, driver.transport.peer_id)

            async def attested() -> Any:
                _, samples = await scrape(http, at_server)
                return samples if total(samples, "swarm_attested_window") == 0 else None

            samples = await wait_until(attested, 30, "window 0's attestation in /metrics")
            assert total(samples, "swarm_reward_share_ratio") == 0.75
            assert total(samples, "swarm_verification_verdicts_total", result="pass", subject="self") == 1
            assert total(samples, "swarm_verification_verdicts_total", result="fail", subject="other") == 1
            assert total(samples, "swarm_flagged_peers") == 1
            _, body = await get_json(http, at_server.url + "api/status")
            [attestation] = body["attestations"]
            assert attestation["window"] == 0 and attestation["shares"][0] == {
                "peer_id": server.transport.peer_id.to_base58(),
                "share": 0.75,
            }
            assert body["flagged"] == [
                {"peer_id": driver.transport.peer_id.to_base58(), "by": "attestation", "windows": [0]}
            ]
    finally:
        for observer in observers:
            await observer.stop()
        await swarm.close()


async def publish_window_zero(swarm: Swarm, server: PeerID, driver: PeerID) -> None:
    """Window 0 as an orchestrator and a validator would publish it: ``server`` earns 3/4 and passes a check,
    ``driver`` earns 1/4, fails a check and is flagged (signed by a peer of its own, joined through the swarm)."""
    run: RunConfig = swarm.run
    assert swarm.bootstrap is not None and run.verification.enabled and run.verification.window_steps <= 5
    judge = Identity.from_seed(b"\x77" * 32)
    transport = Transport(judge, TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=3.0))
    await transport.start()
    dht = DHT.create(with_run_schemas(DHTConfig(initial_peers=(swarm.bootstrap,))), identity=judge, transport=transport)
    try:
        await dht.start()
        verdicts = [
            sign_verdict(
                judge,
                run_id=run.run_id,
                window=0,
                step=1,
                subject=peer,
                receipt_id=bytes([n]) * 32,
                passed=passed,
                reason="" if passed else "output differs",
            )
            for n, (peer, passed) in enumerate([(server, True), (driver, False)])
        ]
        batch = VerdictBatch(run_id=run.run_id, window=0, publisher=judge.peer_id.to_bytes(), verdicts=verdicts)
        assert await publish_verdicts(dht, batch, time.time() + 600)
        outcome = RewardOutcome(work={server: 3.0, driver: 1.0}, shares={server: 0.75, driver: 0.25}, flagged={driver})
        attestation = build_attestation(
            judge,
            run_id=run.run_id,
            window=0,
            term=1,
            cfg=run.verification.rewards(),
            outcome=outcome,
            receipts={},
            verdicts={judge.peer_id: batch},
            prev_digest=GENESIS_DIGEST,
            issued_at=time.time(),
        )
        assert await publish_attestation(dht, attestation, time.time() + 600)
    finally:
        await dht.shutdown()
        await transport.stop()
