"""Issue 13's unsigned write, during training: `{run}/peers` takes only owner-signed PeerRecords on every node."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarm.dht import DHT, DHTConfig
from swarm.dht.keys import peers_key, subkey_owner
from swarm.dht.records import make_record
from tests.training.swarm_harness import Swarm, small_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_an_unsigned_peers_write_during_training_is_refused_and_training_goes_on() -> None:
    run = small_run()
    swarm = Swarm(run)
    attacker: DHT | None = None
    try:
        nodes = [await swarm.add(seed=50 + i, stage=i) for i in range(2)]
        await swarm.wait_step(nodes, 1, timeout_s=60)
        assert swarm.bootstrap is not None
        # `swarm-dht put <run>/peers '"x"' --ttl 600000` from a client without the schemas (an attacker's own build)
        attacker = DHT.create(DHTConfig(initial_peers=(swarm.bootstrap,), client_mode=True))
        await attacker.start()
        key, expiration = peers_key(run.run_id), time.time() + 600_000
        async with asyncio.timeout(30):
            assert not await attacker.store(key, "x", expiration)  # no node stored it
            for node in nodes:
                flags = await attacker.protocol.call_store(node.dht.peer_id, [make_record(key, "x", expiration)])
                assert flags == [False]
        step = max(n.role.server.step for n in nodes if n.role.server is not None)
        await swarm.wait_step(nodes, step + 2, timeout_s=90)  # before: every driver lost its peers here
        async with asyncio.timeout(30):
            found = await attacker.get(key, latest=True)
        assert isinstance(found, dict) and {subkey_owner(k) for k in found} == {n.dht.peer_id for n in nodes}
        assert all(set(n.role.view.peers) == {m.dht.peer_id for m in nodes} for n in nodes)
    finally:
        if attacker is not None:
            await attacker.shutdown()
        await swarm.close()
