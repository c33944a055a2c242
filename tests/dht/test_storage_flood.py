"""The storage attacks of issue 13 against a real `swarm-node start --role dht` process (default limits).

Figures before the byte budgets (10,000 records, full size, `python tests/dht/flood_attack.py`): one identity
stored all 10,000 x 60 KB records and the node's RSS went from 235 to 833 MiB; with the cache flag set, 10,000
more; 50 identities of one IP stored 10,000 more (+615 MiB); 200 junk subkeys made `get` of the key fail; a
plain value replaced the owners' dictionary. Here the flood is scaled down to 1,500 records per attack.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
from flood_attack import VALUE_BYTES, node_process, run_phase

from swarm.dht.budget import RECORD_OVERHEAD_BYTES

MIB = 1024 * 1024
BUDGET = 64 * MIB  # DHTConfig.storage_budget_bytes: the node runs with the defaults
RECORD_BYTES = VALUE_BYTES + RECORD_OVERHEAD_BYTES  # at least what one flood record costs
ARGS = argparse.Namespace(records=1500, identities=20, per_identity=75, junk_subkeys=200)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_byte_floods_are_capped_and_the_node_memory_stays_under_the_budget(tmp_path: Path) -> None:
    with node_process(tmp_path / "flood") as node:
        one = asyncio.run(run_phase(node, "one_identity", ARGS))
        flag = asyncio.run(run_phase(node, "cache_flag", ARGS))
        many = asyncio.run(run_phase(node, "many_identities", ARGS))
    print(f"one identity {one}\ncache flag {flag}\nmany identities {many}")
    assert 0 < one["stored"] <= BUDGET // 8 // RECORD_BYTES  # max_share_per_peer of 1/8
    assert flag["stored"] == 0  # a STORE carrying a cache flag is malformed now
    assert many["stored"] > 0 and one["stored"] + many["stored"] <= BUDGET // 4 // RECORD_BYTES  # one IP: 1/4
    flooded_mib = (ARGS.records * 2 + ARGS.identities * ARGS.per_identity) * VALUE_BYTES / MIB
    growth_mib = many["rss_after_mib"] - one["rss_before_mib"]
    assert flooded_mib > 250 and growth_mib < BUDGET / MIB, (growth_mib, flooded_mib)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_junk_subkeys_and_a_plain_value_do_not_hide_the_owners_records(tmp_path: Path) -> None:
    with node_process(tmp_path / "junk") as node:
        plain = asyncio.run(run_phase(node, "plain_over_dictionary", ARGS))
        junk = asyncio.run(run_phase(node, "junk_subkeys", ARGS))
    print(f"plain over dictionary {plain}\njunk subkeys {junk}")
    assert plain["plain_stored"] == 0 and plain["got"] == "dictionary"
    assert junk["junk_stored"] == 200 and junk["get_ok"] and junk["owner_seen"]
