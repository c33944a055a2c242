"""swarm.dht.keys: every key of a run, byte-identical to the strings on the wire, and the owner subkeys."""

from __future__ import annotations

from swarm.dht import keys
from swarm.p2p.identity import Identity

from dht_testutil import make_identity

RUN = "tiny_gpt-0123456789ab"


def test_keys_are_the_strings_on_the_wire_and_each_matches_only_its_own_pattern() -> None:
    built = {
        keys.PEERS: (keys.peers_key(RUN), f"{RUN}/peers"),
        keys.PROGRESS: (keys.progress_key(RUN), f"{RUN}/progress"),
        keys.CONFIG: (keys.config_key("tiny_gpt"), "runs/tiny_gpt/config"),
        keys.AVERAGING_GROUP: (keys.averaging_group_key(RUN, 1, 42), f"{RUN}/avg/1/42"),
        keys.RECEIPTS: (keys.receipts_key(RUN, 3), f"{RUN}/receipts/3"),
        keys.VERDICTS: (keys.verdicts_key(RUN, 3), f"{RUN}/verdicts/3"),
        keys.OUTLIERS: (keys.outliers_key(RUN, 3), f"{RUN}/outliers/3"),
        keys.ATTESTATION: (keys.attestation_key(RUN, 3), f"{RUN}/attestation/3"),
        keys.ORCHESTRATOR: (keys.orchestrator_key(RUN), f"{RUN}/orchestrator"),
    }
    assert set(built) == set(keys.ALL_PATTERNS)
    for pattern, (key, expected) in built.items():
        assert key == expected
        assert [p.name for p in keys.ALL_PATTERNS if p.matches(key)] == [pattern.name]
    for other in ("greeting", f"{RUN}/peers/x", f"a/{RUN}/peers", f"{RUN}/avg/1/x", f"{RUN}/avg/-1/2", b"run/peers", 7):
        assert not any(p.matches(other) for p in keys.ALL_PATTERNS), other


def test_owner_subkeys_parse_back_and_nothing_else_does() -> None:
    me = make_identity(1).peer_id
    assert keys.owner_subkey(me) == f"[owner:{me.to_base58()}]"
    assert keys.subkey_owner(keys.owner_subkey(me)) == me and keys.is_owner_subkey(keys.owner_subkey(me))
    assert keys.part_subkey(me, 7) == f"[owner:{me.to_base58()}]#7"
    assert keys.part_subkey_owner(keys.part_subkey(me, 7)) == (me, 7)
    assert keys.subkey_owner(keys.part_subkey(me, 7)) is None
    assert keys.part_subkey_owner(keys.owner_subkey(me)) is None
    forged = keys.owner_subkey(Identity.from_seed(b"\x09" * 32).peer_id)[:-3] + "]"  # base58 but not a PeerID
    for junk in (
        "[owner:]",
        "[owner:0OIl]",
        "x" + keys.owner_subkey(me),
        forged,
        None,
        5,
        keys.owner_subkey(me).encode(),
    ):
        assert keys.subkey_owner(junk) is None and not keys.is_owner_subkey(junk), junk
