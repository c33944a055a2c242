"""The join check (issue 13): a node refuses to join only when a strict majority of the live, owner-signed records of
its run name hold another config; unowned writes and a single attacker identity cannot lock an honest node out."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import SimpleNamespace

import pytest

from swarm.dht import DHT, DHTConfig
from swarm.dht.keys import config_key, owner_subkey, peers_key
from swarm.dht.records import make_record
from swarm.dht.schema import Entry
from swarm.errors import ConfigError, RecordError, SwarmError
from swarm.p2p.identity import Identity, PeerID
from swarm.run.config import RunConfig
from swarm.training.join_check import check_join, collect_votes
from swarm.training.messages import CONFIG_SCHEMA, MAX_PEER_RECORD_TTL_S, PeerRecord, RunConfigRecord
from swarm.training.node_role import Role
from swarm.training.schemas import with_run_schemas
from swarm.training.sync import JOIN_READ_ATTEMPTS, StateSync
from tests.training.swarm_harness import Swarm, small_run

NOW = 1_000_000.0


def _peer(seed: int) -> PeerID:
    return Identity.from_seed(bytes([seed]) * 32).peer_id


def _other(run: RunConfig) -> RunConfig:
    return dataclasses.replace(run, optimizer=dataclasses.replace(run.optimizer, lr=0.1))


def _config_entry(owner: PeerID, run: RunConfig, *, expires: float = NOW + 10, hash_: str | None = None) -> Entry:
    record = RunConfigRecord(hash=hash_ or run.config_hash(), config=run.to_dict())
    return Entry(owner_subkey(owner), owner, RunConfigRecord.from_wire(record.to_wire()), expires)


def _peer_entry(owner: PeerID, run: RunConfig) -> Entry:
    record = PeerRecord(role=Role.AUTO, stage=0, maddrs=[], throughput=1.0, step=3, config_hash=run.config_hash())
    return Entry(owner_subkey(owner), owner, record, NOW + 10)


def _check(run: RunConfig, configs: list[Entry], peers: list[Entry] = [], me: PeerID | None = None) -> None:  # noqa: B006
    votes = collect_votes(configs, peers, me=me or _peer(99), my_hash=run.config_hash(), now=NOW)
    check_join(run, votes)


def test_an_honest_node_outvotes_a_single_attacker_identity() -> None:
    run = small_run()
    honest = [_config_entry(_peer(1), run), _config_entry(_peer(2), run)]
    attacker = _config_entry(_peer(3), _other(run))
    _check(run, [*honest, attacker])  # 2 agree, 1 disagrees: joins
    _check(run, [honest[0], attacker])  # a tie joins
    _check(run, [attacker], peers=[_peer_entry(_peer(1), run)])  # a live peer record of the run votes too
    _check(run, [])  # the first node of a run


def test_a_misconfigured_node_gets_the_field_error() -> None:
    run = small_run()
    swarm = [_config_entry(_peer(1), run), _config_entry(_peer(2), run)]
    wrong = _other(run)
    with pytest.raises(ConfigError, match=r"run config differs in field 'optimizer\.lr'"):
        _check(wrong, swarm)
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        _check(wrong, swarm[:1])  # a one-node swarm
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):  # 2 against 1 that agrees with the wrong config
        _check(wrong, [*swarm, _config_entry(_peer(3), wrong)])


def test_own_expired_and_inconsistent_entries_do_not_vote() -> None:
    run = small_run()
    wrong = _other(run)
    me = _peer(1)
    _check(run, [_config_entry(me, wrong)], me=me)  # this node's own entry of an earlier start
    _check(run, [_config_entry(_peer(2), wrong, expires=NOW - 1)])  # expired
    _check(run, [_config_entry(_peer(2), wrong, hash_="ab" * 32)])  # a hash that is not its config's
    # a peer record under this run with another hash is no vote against (it names no config to compare)
    other_hash = PeerRecord(role=Role.AUTO, stage=0, maddrs=[], throughput=1.0, step=3, config_hash="ab" * 32)
    _check(run, [], peers=[Entry(owner_subkey(_peer(2)), _peer(2), other_hash, NOW + 10)])


def test_the_config_key_takes_only_owner_signed_entries_that_expire_soon() -> None:
    run = small_run()
    identity = Identity.from_seed(b"\x07" * 32)
    key, value = config_key(run.name), RunConfigRecord(hash=run.config_hash(), config=run.to_dict()).to_wire()
    now = time.time()
    CONFIG_SCHEMA.check(
        make_record(key, value, now + 10, owner_subkey(identity.peer_id), identity=identity), now=now, clock_skew_s=0
    )
    with pytest.raises(RecordError, match="plain value is refused"):
        CONFIG_SCHEMA.check(make_record(key, value, now + 10), now=now, clock_skew_s=0)
    with pytest.raises(RecordError, match="maximum"):
        expiration = now + MAX_PEER_RECORD_TTL_S + 60
        record = make_record(key, value, expiration, owner_subkey(identity.peer_id), identity=identity)
        CONFIG_SCHEMA.check(record, now=now, clock_skew_s=0)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_an_honest_node_joins_despite_a_poisoned_config_key() -> None:
    run = small_run()
    swarm = Swarm(run)
    clients: list[DHT] = []
    try:
        nodes = [await swarm.add(seed=60 + i, stage=i) for i in range(2)]
        assert swarm.bootstrap is not None
        key, expiration = config_key(run.name), time.time() + 200
        wrong = _other(run)
        poison = RunConfigRecord(hash=wrong.config_hash(), config=wrong.to_dict()).to_wire()
        # an unowned write from a client without the schemas (what the old join check trusted): every node refuses it
        plain = DHT.create(DHTConfig(initial_peers=(swarm.bootstrap,), client_mode=True))
        # one attacker identity with a different config: a valid owner-signed entry
        attacker = DHT.create(
            with_run_schemas(DHTConfig(initial_peers=(swarm.bootstrap,), client_mode=True)),
            identity=Identity.from_seed(b"\x55" * 32),
        )
        for client in (plain, attacker):
            clients.append(client)
            await client.start()
        async with asyncio.timeout(30):
            assert not await plain.store(key, poison, expiration)
            for node in nodes:
                assert await plain.protocol.call_store(node.dht.peer_id, [make_record(key, poison, expiration)]) == [
                    False
                ]
            assert await attacker.store(key, poison, expiration, subkey=owner_subkey(attacker.peer_id))
            found = await attacker.get(key, latest=True)
        owners = {e.owner for e in CONFIG_SCHEMA.entries(found)}
        assert owners == {attacker.peer_id, *(n.dht.peer_id for n in nodes)}  # the honest nodes publish theirs too
        late = await swarm.add(seed=62, stage=1)  # before: "run config differs in field 'optimizer.lr'"
        await swarm.wait_step([late], late.role.current_step() + 1, timeout_s=60)
        swarm.run = wrong  # a node that really is misconfigured is still refused: 3 honest entries outvote it
        with pytest.raises(ConfigError, match=r"optimizer\.lr"):
            await swarm.add(seed=63)
        async with asyncio.timeout(30):
            peers = await attacker.get(peers_key(run.run_id), latest=True)
        assert isinstance(peers, dict) and len(peers) == 3
        # the roles' wiring of the lower layers: the run's keys are evicted last, the run's peers' connections kept
        members = [*nodes, late]
        for node in members:
            assert node.dht.storage._prefixes == (f"{run.run_id}/", f"runs/{run.name}/")  # type: ignore[attr-defined]
            view = set(node.role.view.peers) - {node.dht.peer_id}
            assert view and node.transport.protected_peers("training") == view
        late.trainer.stop()
        assert late.transport.protected_peers("training") == set()
    finally:
        for client in clients:
            await client.shutdown()
        await swarm.close()


class _SlowDHT:
    """A DHT whose first ``hangs`` reads never answer (a swarm too busy to reply in time), then answer empty."""

    def __init__(self, hangs: int) -> None:
        self.hangs = hangs
        self.reads = 0

    async def get(self, key: str, latest: bool = False) -> None:
        self.reads += 1
        if self.reads <= self.hangs:
            await asyncio.sleep(3600)


def _sync_over(dht: _SlowDHT) -> StateSync:
    run = small_run()
    state = SimpleNamespace(
        cfg=SimpleNamespace(dht_timeout_s=0.05), dht=dht, run_cfg=run, run_id=run.run_id, me=_peer(1)
    )
    return StateSync(state, records=None, checks=None)  # type: ignore[arg-type]


async def test_a_join_read_that_times_out_is_retried_then_gives_up_with_a_clear_error() -> None:
    slow = _SlowDHT(hangs=2)  # the first attempt's two reads hang: the second attempt answers
    assert await _sync_over(slow)._read_join_records() == (None, None)
    assert slow.reads == 4
    dead = _SlowDHT(hangs=1_000)
    with pytest.raises(SwarmError, match="could not read the run's records from the DHT in 3 attempts"):
        await _sync_over(dead)._read_join_records()
    assert dead.reads == 2 * JOIN_READ_ATTEMPTS
