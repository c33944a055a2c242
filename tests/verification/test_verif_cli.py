"""`swarm-dht attestations --verify` against a real DHT node process: good, replayed and tampered attestations."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import os
import signal
import subprocess
import time
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from verif_helpers import make_identity

from swarm.dht import DHT, DHTConfig
from swarm.p2p.identity import Identity
from swarm.p2p import TransportConfig
from swarm.cli.dht import main
from swarm.dht.keys import attestation_key, owner_subkey
from swarm.local.events import EventReader, ListeningEvent
from swarm.verification.attestation import GENESIS_DIGEST, build_attestation, publish_attestation
from swarm.verification.common import digest_parts
from swarm.verification.receipts import ReceiptBatch, WorkClaim, publish_receipts, sign_ack, sign_receipt
from swarm.verification.rewards import RewardConfig, compute_rewards

# A bare DHT node process (independent of the training CLI): reports its multiaddrs in the events file named by
# its argument (swarm.local.events), serves until stdin closes.
DHT_NODE = """
import asyncio, sys
from pathlib import Path
from swarm.dht import DHT, DHTConfig
from swarm.local.events import EventWriter, ListeningEvent
from swarm.p2p import TransportConfig

async def main():
    cfg = DHTConfig(transport=TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",)), maintenance_interval_s=3600.0)
    async with DHT.create(cfg) as dht:
        EventWriter(Path(sys.argv[1])).emit(ListeningEvent(maddrs=list(dht.listen_maddrs)))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""
CFG = RewardConfig(window_steps=10)


def client(identity: Identity, maddr: str) -> DHT:
    return DHT.create(
        DHTConfig(
            initial_peers=(maddr,),
            client_mode=True,
            rpc_timeout_s=3.0,
            transport=TransportConfig(),
            maintenance_interval_s=3600.0,
        ),
        identity=identity,
    )


async def populate(maddr: str) -> None:
    server, caller, orch = make_identity("cli-server"), make_identity("cli-caller"), make_identity("cli-orch")
    async with client(caller, maddr) as caller_dht, client(orch, maddr) as orch_dht:
        for run in ("good", "tampered"):
            prev = None
            for window in (0, 1):
                claim = WorkClaim(
                    run_id=run,
                    step=10 * window + 1,
                    stage=0,
                    server=server.peer_id.to_bytes(),
                    caller=caller.peer_id.to_bytes(),
                    microbatch_id=f"mb-{window}",
                    kind="forward",
                    input_hash=digest_parts([b"i"]),
                    output_hash=digest_parts([b"o"]),
                    num_samples=2,
                )
                batch = ReceiptBatch(
                    run_id=run,
                    window=window,
                    publisher=caller.peer_id.to_bytes(),
                    receipts=[sign_receipt(caller, claim, sign_ack(server, claim))],
                )
                assert await publish_receipts(caller_dht, batch, time.time() + 600)
                receipts = {caller.peer_id: batch}
                out = compute_rewards(run, window, receipts, {}, [], CFG)
                att = build_attestation(
                    orch,
                    run_id=run,
                    window=window,
                    term=1,
                    cfg=CFG,
                    outcome=out,
                    receipts=receipts,
                    verdicts={},
                    prev_digest=prev.digest if prev else GENESIS_DIGEST,
                    issued_at=1.0,
                )
                if run == "tampered" and window == 1:
                    att = dataclasses.replace(att, shares=[dataclasses.replace(att.shares[0], work=99.0)])
                assert await publish_attestation(orch_dht, att, time.time() + 600)
                prev = att
            if run == "good":  # window 0's attestation replayed as window 2's
                replayed = _first(run, orch, caller, server)
                assert await orch_dht.store(
                    attestation_key(run, 2), replayed.pack(), time.time() + 600, subkey=owner_subkey(orch.peer_id)
                )


def _first(run: str, orch: Identity, caller: Identity, server: Identity):
    claim = WorkClaim(
        run_id=run,
        step=1,
        stage=0,
        server=server.peer_id.to_bytes(),
        caller=caller.peer_id.to_bytes(),
        microbatch_id="mb-0",
        kind="forward",
        input_hash=digest_parts([b"i"]),
        output_hash=digest_parts([b"o"]),
        num_samples=2,
    )
    batch = ReceiptBatch(
        run_id=run,
        window=0,
        publisher=caller.peer_id.to_bytes(),
        receipts=[sign_receipt(caller, claim, sign_ack(server, claim))],
    )
    receipts = {caller.peer_id: batch}
    out = compute_rewards(run, 0, receipts, {}, [], CFG)
    return build_attestation(
        orch,
        run_id=run,
        window=0,
        term=1,
        cfg=CFG,
        outcome=out,
        receipts=receipts,
        verdicts={},
        prev_digest=GENESIS_DIGEST,
        issued_at=1.0,
    )


def cli(maddr: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--initial-peers", maddr, "attestations", *args])
    # what a user pipes is stdout (log lines go to stderr); a failure shows both
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


@pytest.fixture(scope="module")
def swarm_maddr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DHT node process holding the "good" and "tampered" runs of `populate`; its multiaddr."""
    folder = tmp_path_factory.mktemp("dht-node")
    proc = subprocess.Popen(
        [sys.executable, "-c", DHT_NODE, str(folder / "events.jsonl")],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        events = EventReader(folder / "events.jsonl")
        maddr = events.wait_for_blocking(ListeningEvent, alive=lambda: proc.poll() is None, timeout_s=60).maddrs[0]
        asyncio.run(populate(maddr))
        yield maddr
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_attestations_verify_good_replayed_and_tampered(swarm_maddr: str) -> None:
    maddr = swarm_maddr
    code, out = cli(maddr, "--run", "good", "--window", "1", "--verify", "--json")
    assert code == 0, out
    rows = json.loads(out)
    assert [r["window"] for r in rows] == [1] and rows[0]["ok"] and rows[0]["verified"]
    assert sum(rows[0]["shares"].values()) == pytest.approx(1.0)

    code, out = cli(maddr, "--run", "good", "--verify", "--json")
    rows = json.loads(out)
    assert code == 1 and [r["window"] for r in rows] == [0, 1, 2]
    assert rows[0]["ok"] and rows[1]["ok"] and not rows[2]["ok"]
    assert any("replayed" in p for p in rows[2]["problems"])

    code, out = cli(maddr, "--run", "tampered", "--window", "1", "--verify", "--json")
    assert code == 1 and "no validly signed attestation" in out and "signature does not verify" in out
    code, out = cli(maddr, "--run", "tampered", "--window", "1")
    assert code == 0 and "WINDOW" in out.splitlines()[0]


def _payouts_header(path: Path) -> dict[str, str]:
    lines = [line[2:] for line in path.read_text().splitlines() if line.startswith("# ") and "=" in line]
    return dict(line.split("=", 1) for line in lines if not line.startswith("left_out_window"))


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_attestations_payouts_csv(swarm_maddr: str, tmp_path: Path) -> None:
    maddr, csv_path = swarm_maddr, tmp_path / "payouts.csv"
    code, out = cli(maddr, "--run", "good", "--window", "1", "--verify", "--payouts", str(csv_path))
    assert code == 0, out
    header = _payouts_header(csv_path)
    assert header["run_id"] == "good" and header["windows"] == "1..1" and header["left_out"] == "0"
    rows = list(csv.DictReader(line for line in csv_path.read_text().splitlines() if not line.startswith("#")))
    server = make_identity("cli-server").peer_id
    assert [(r["peer_id"], float(r["share"]), r["windows"]) for r in rows] == [(server.to_base58(), 1.0, "1")]

    # the tampered window 1 is left out, the file says so and the exit code says a window failed
    code, out = cli(maddr, "--run", "tampered", "--verify", "--payouts", str(csv_path))
    assert code == 1, out
    header = _payouts_header(csv_path)
    assert header["run_id"] == "tampered" and header["windows"] == "0..1" and header["left_out"] == "1"
    assert header["counted"] == "1" and "# left_out_window=1: no validly signed attestation" in csv_path.read_text()

    # bad input: each a clear error, and no file written
    for args, message in [
        (("--run", "no-such-run", "--verify", "--payouts", str(tmp_path / "x.csv")), "no attestation of run"),
        (("--run", "good", "--verify", "--payouts", str(tmp_path / "missing" / "x.csv")), "does not exist"),
        (("--run", "good", "--verify", "--payouts", str(tmp_path)), "is a directory"),
        (("--run", "good", "--payouts", str(tmp_path / "x.csv")), "--payouts needs --verify"),
    ]:
        code, out = cli(maddr, *args)
        assert code != 0 and message in out, (args, out)
    assert not (tmp_path / "x.csv").exists()
