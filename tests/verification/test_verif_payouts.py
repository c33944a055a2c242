"""Payouts (`swarm.verification.payouts`) over the in-process acceptance swarm of test_verif_swarm_sim: a lazy miner
is flagged and paid nothing; each window's shares sum to 1; a tampered attestation is left out and counted."""

from __future__ import annotations

import asyncio
import copy
import csv
import dataclasses

import base58
import pytest
from test_verif_swarm_sim import RUN, run_swarm
from verif_helpers import MemoryStore

from swarm.dht.keys import attestation_key
from swarm.p2p.identity import PeerID
from swarm.verification.attestation import Attestation
from swarm.verification.audit import audit_run
from swarm.verification.payouts import CSV_COLUMNS, PayoutReport, payouts_from_audits, public_key_base58


def parse_csv(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The ``# key=value`` header lines and the rows of a payouts CSV."""
    header: dict[str, str] = {}
    lines = text.splitlines()
    for line in lines:
        if line.startswith("# ") and "=" in line:
            key, _, value = line[2:].partition("=")
            header.setdefault(key, value)
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return header, rows


def tamper(store: MemoryStore, window: int) -> None:
    """Change the work of the first share entry of a stored attestation, keeping its (now wrong) signature."""
    for subkey, stored in store.data[attestation_key(RUN, window)].items():
        att = Attestation.unpack(stored.value)
        bad = dataclasses.replace(att, shares=[dataclasses.replace(att.shares[0], work=att.shares[0].work + 1.0)])
        store.data[attestation_key(RUN, window)][subkey] = dataclasses.replace(stored, value=bad.pack())


@pytest.fixture(scope="module")
def lazy_swarm() -> tuple[MemoryStore, PeerID, list[PeerID]]:
    """The swarm with one lazy miner, run once (about a second); tests take a copy of its store."""
    _accepted, cheater, info = asyncio.run(run_swarm("lazy"))
    return info["store"], cheater.peer_id, [m.peer_id for m in info["miners"]]


@pytest.fixture
def lazy_run(lazy_swarm: tuple[MemoryStore, PeerID, list[PeerID]]) -> tuple[MemoryStore, PeerID, list[PeerID]]:
    store, cheater, miners = lazy_swarm
    return copy.deepcopy(store), cheater, miners


async def test_flagged_cheater_gets_nothing_and_each_window_pays_one(lazy_run):
    store, cheater, miners = lazy_run
    audits = await audit_run(store, RUN, verify=True)
    assert audits and all(a.ok for a in audits), [a.problems for a in audits]
    for audit in audits:
        assert sum(e.share for e in audit.attestation.shares) == pytest.approx(1.0)
    report = payouts_from_audits(RUN, audits)
    header, rows = parse_csv(report.to_csv())
    assert header["run_id"] == RUN
    assert header["windows"] == f"{audits[0].window}..{audits[-1].window}"
    assert header["left_out"] == "0" and int(header["counted"]) == len(audits)
    assert list(rows[0]) == list(CSV_COLUMNS)
    by_peer = {row["peer_id"]: row for row in rows}
    assert set(by_peer) == {p.to_base58() for p in miners}
    assert float(by_peer[cheater.to_base58()]["share"]) == 0.0
    assert int(by_peer[cheater.to_base58()]["flagged_windows"]) == len(audits)
    honest = [row for peer, row in by_peer.items() if peer != cheater.to_base58()]
    assert all(float(row["share"]) > 0 and row["flagged_windows"] == "0" for row in honest)
    # the column sums to one per window with work: here every counted window
    assert int(header["windows_with_work"]) == len(audits)
    assert sum(float(row["share"]) for row in rows) == pytest.approx(len(audits), abs=1e-9)
    for row in rows:  # the Solana address is the raw Ed25519 key inside the PeerID
        key = base58.b58decode(row["public_key_base58"])
        assert len(key) == 32 and PeerID.from_public_key(key).to_base58() == row["peer_id"]


async def test_tampered_attestations_are_left_out_and_counted(lazy_run):
    store, _cheater, _miners = lazy_run
    clean = payouts_from_audits(RUN, await audit_run(store, RUN, verify=True))
    last = clean.last_window
    tamper(store, last)
    report = payouts_from_audits(RUN, await audit_run(store, RUN, verify=True))
    header, rows = parse_csv(report.to_csv())
    assert header["left_out"] == "1" and report.counted == clean.counted[:-1]
    assert header["windows"] == f"0..{last}"
    assert header["left_out_window"].startswith(f"{last}: no validly signed attestation")
    assert sum(float(row["share"]) for row in rows) == pytest.approx(len(clean.counted) - 1, abs=1e-9)

    # a tampered window in the middle also leaves out the next one, whose chain link cannot be checked
    tamper(store, 1)
    report = payouts_from_audits(RUN, await audit_run(store, RUN, verify=True))
    assert sorted(report.left_out) == [1, 2, last] and report.counted == [0, *range(3, last)]
    assert "prev_digest" in report.left_out[2]
    assert parse_csv(report.to_csv())[0]["left_out"] == "3"


def test_payouts_refuse_no_windows_and_unverified_audits():
    with pytest.raises(ValueError, match="no attestation windows"):
        payouts_from_audits("nope", [])
    from swarm.verification.audit import WindowAudit

    with pytest.raises(ValueError, match="verified"):
        payouts_from_audits("r", [WindowAudit(window=0, attestation=None, num_attestations=0, verified=False)])


def test_public_key_base58_is_the_raw_key():
    peer = PeerID.from_base58("12D3KooWAXz794nXW2C8F2kc3WhyhXm5AVFUvGtDXtvFxjRvLkd2")
    assert base58.b58decode(public_key_base58(peer)) == peer.public_key_bytes
    assert isinstance(PayoutReport(run_id="r", first_window=0, last_window=0).to_csv(), str)
