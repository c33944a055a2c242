"""256 nodes in one process: every key found from every node, k-closest = brute force, few lookup rounds."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from dht_testutil import LOOPBACK, Swarm

from swarm.dht.routing import key_id_of
from swarm.p2p import TransportConfig

N = 256


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_256_nodes_find_everything_in_few_rounds() -> None:
    s = Swarm(seed=42)
    # short idle timeout: 256 nodes in one process must not hold thousands of idle connections
    transport = TransportConfig(listen_maddrs=LOOPBACK, idle_timeout_s=1.0)
    try:
        async with asyncio.timeout(540):
            for _ in range(N):
                await s.add(transport=transport, join_refresh=False)
            now = time.time()
            keys = [f"scale{i}" for i in range(3)]
            for i, key in enumerate(keys):
                assert await s.rng.choice(s.nodes).store(key, i, now + 300)
            rounds = []
            for node in s.nodes:
                for i, key in enumerate(keys):
                    found = await node.get(key)
                    assert found is not None and found.value == i, (node.peer_id, key)
                    if node.last_lookup is not None:
                        rounds.append(node.last_lookup.rounds)
            mean_rounds = sum(rounds) / len(rounds)
            print(f"N={N}: mean lookup rounds {mean_rounds:.2f} over {len(rounds)} network gets")
            assert len(rounds) > N  # most gets went to the network
            assert mean_rounds <= math.ceil(math.log2(N) / 4) + 2, mean_rounds
            for i in range(10):
                key = f"closest{i}"
                origin = s.rng.choice(s.nodes)
                kid = key_id_of(key)
                peers = await origin.find_peers(key, 20)
                others = sorted((n for n in s.nodes if n is not origin), key=lambda n: n.table.local_id ^ kid)
                assert [c.peer_id for c in peers] == [n.peer_id for n in others[:20]]
    finally:
        await s.stop_all()
