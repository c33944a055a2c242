"""`swarm-dht` against a local swarm of real `swarm-node start` processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from swarm.cli.dht import main
from swarm.dht import DHT, DHTConfig
from swarm.dht.records import make_record
from swarm.p2p.identity import Identity
from swarm.p2p.maddr import parse_maddr
from swarm.local.events import EventReader, ListeningEvent

# DHT-only nodes (--role dht): this test exercises the DHT, and training nodes would compete for the CPU
NODE_CMD = [
    sys.executable,
    "-c",
    "from swarm.cli.node import main; main()",
    "start",
    "--role",
    "dht",
    "--log-level",
    "WARNING",
]
JOIN_DEADLINE_S = 60.0


def _spawn(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    events = ["--events-file", str(tmp_path / f"{name}.events.jsonl")]
    return subprocess.Popen(
        [*NODE_CMD, "--data-dir", str(tmp_path / name), *events, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _maddr(proc: subprocess.Popen[str], tmp_path: Path, name: str) -> str:
    """The node's multiaddr from its ``listening`` event (reported as soon as it listens)."""
    events = EventReader(tmp_path / f"{name}.events.jsonl")
    return events.wait_for_blocking(
        ListeningEvent, alive=lambda: proc.poll() is None, timeout_s=JOIN_DEADLINE_S
    ).maddrs[0]


def _wait_joined(first: str, others: list[str]) -> None:
    """Wait until ``first`` lists every other node in its routing table.

    A node reports ``listening`` before it joins through its initial peers, so the event alone does not say that
    the swarm knows it yet.
    """
    want = {str(parse_maddr(m).peer_id) for m in others}
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while True:  # bounded by the deadline; each round is one request to `first`
        code, out = _cli("--initial-peers", first, "routing-table", "--json")
        if code == 0 and want <= {row["peer_id"] for row in json.loads(out)}:
            return
        assert time.monotonic() < deadline, f"{first} did not learn of {sorted(want)} in {JOIN_DEADLINE_S} s: {out}"


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    if "--rpc-timeout" not in args:  # generous: the test machine may be busy
        args = ("--rpc-timeout", "10", *args)
    result = CliRunner().invoke(main, list(args), env=env)
    # what a user pipes is stdout (log lines go to stderr); a failure shows both
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_swarm_dht_inspects_a_local_swarm(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_spawn(tmp_path, "a"))
        first = _maddr(procs[0], tmp_path, "a")
        maddrs = [first]
        for name in ("b", "c"):
            procs.append(_spawn(tmp_path, name, "--initial-peers", first))
            maddrs.append(_maddr(procs[-1], tmp_path, name))
        _wait_joined(first, maddrs[1:])
        env = {"SWARM_INITIAL_PEERS": first}

        code, out = _cli("peers", "--json", env=env)
        assert code == 0, out
        listed = {row["peer_id"]: row for row in json.loads(out)}
        assert set(listed) == {str(parse_maddr(m).peer_id) for m in maddrs}
        assert all(row["maddrs"] and row["role"] is None for row in listed.values())

        code, out = _cli("--initial-peers", maddrs[2], "put", "greeting", '{"hi": 1}', "--ttl", "60")
        assert code == 0 and "True" in out, out
        code, out = _cli("get", "greeting", "--json", env=env)
        assert code == 0 and json.loads(out)[0]["value"] == {"hi": 1}, out

        key = tmp_path / "me.pem"
        me = Identity.from_seed(b"\x05" * 32)
        me.save(key)
        record = '{"role": "server", "stage": 0, "maddrs": [], "throughput": 1.5, "step": 3, "config_hash": "h"}'
        code, out = _cli(
            "put",
            "run1/peers",
            record,
            "--ttl",
            "60",
            "--owned",
            "--identity",
            str(key),
            env=env,
        )
        assert code == 0, out
        code, out = _cli("get", "run1/peers", "--latest", "--json", env=env)
        rows = json.loads(out)
        assert rows[0]["subkey"] == f"[owner:{me.peer_id}]" and rows[0]["value"]["role"] == "server"

        code, out = _cli("routing-table", "--json", env=env)
        assert code == 0, out
        assert {r["peer_id"] for r in json.loads(out)} == {str(parse_maddr(m).peer_id) for m in maddrs[1:]}
        code, out = _cli("routing-table", env=env)
        assert out.splitlines()[0].split() == ["BUCKET", "PEER_ID", "MADDRS"]

        code, out = _cli("get", "no-such-key", env=env)
        assert code == 1 and "(none)" in out
        code, out = _cli("put", "k", "v", "--ttl", "5", "--owned", env=env)
        assert code != 0 and "--identity" in out
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.communicate(timeout=30)


def test_no_answering_initial_peer_is_a_clear_error() -> None:
    code, out = _cli("--initial-peers", "/ip4/127.0.0.1/tcp/9", "--rpc-timeout", "1", "get", "k")
    assert code == 1 and "none of the 1 initial peers answered" in out
    code, out = _cli("get", "k", env={"SWARM_INITIAL_PEERS": ""})
    assert code == 2 and "SWARM_INITIAL_PEERS" in out


async def _store_without_checks(
    initial_peer: str, key: str, value: object, ttl_s: float, peers: list[str]
) -> list[bool]:
    """What a client built without the schemas sends: one STORE to the closest nodes, then one to each of ``peers``;
    a flag per STORE: did any node keep it."""
    config = DHTConfig(initial_peers=(initial_peer,), client_mode=True, rpc_timeout_s=10.0, lookup_timeout_s=20.0)
    async with DHT.create(config) as dht:
        expiration = time.time() + ttl_s
        flags = [await dht.store(key, value, expiration)]
        for maddr in peers:
            peer_id = await dht.transport.connect(parse_maddr(maddr))
            flags += await dht.protocol.call_store(peer_id, [make_record(key, value, expiration)])
        return flags


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_unsigned_write_over_the_peer_records_is_refused_by_live_nodes(tmp_path: Path) -> None:
    """Issue 13: `swarm-dht put <run>/peers '"x"' --ttl 600000` replaced every owner-signed peer record."""
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_spawn(tmp_path, "a"))
        first = _maddr(procs[0], tmp_path, "a")
        procs.append(_spawn(tmp_path, "b", "--initial-peers", first))
        maddrs = [first, _maddr(procs[1], tmp_path, "b")]
        _wait_joined(first, maddrs[1:])
        env = {"SWARM_INITIAL_PEERS": first}
        owners = []
        for seed in (7, 8):
            owner = Identity.from_seed(bytes([seed]) * 32)
            owner.save(tmp_path / f"{seed}.pem")
            record = json.dumps(
                {"role": "server", "stage": seed - 7, "maddrs": [], "throughput": 1.0, "step": 5, "config_hash": "h"}
            )
            code, out = _cli(
                "put",
                "run1/peers",
                record,
                "--ttl",
                "60",
                "--owned",
                "--identity",
                str(tmp_path / f"{seed}.pem"),
                env=env,
            )
            assert code == 0, out
            owners.append(f"[owner:{owner.peer_id}]")

        code, out = _cli("put", "run1/peers", '"x"', "--ttl", "600000", env=env)
        assert code == 1 and "a plain value is refused" in out, out  # swarm-dht checks before it sends
        # and every node refuses it from a client that does not check
        assert asyncio.run(_store_without_checks(first, "run1/peers", "x", 600_000, maddrs)) == [False, False, False]

        code, out = _cli("get", "run1/peers", "--latest", "--json", env=env)
        assert code == 0, out
        assert sorted(row["subkey"] for row in json.loads(out)) == sorted(owners)
        code, out = _cli("routing-table", "--json", env=env)  # still serving
        assert code == 0, out
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.communicate(timeout=30)
