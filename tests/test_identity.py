"""Identity: key files (PEM, 0600), libp2p-compatible PeerIDs, signatures."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from multiaddr import Multiaddr

from swarm.p2p.identity import Identity, PeerID
from swarm.errors import IdentityError


def test_peer_id_is_libp2p_compatible() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    text = identity.peer_id.to_base58()
    assert text.startswith("12D3KooW")
    maddr = Multiaddr(f"/ip4/127.0.0.1/tcp/31337/p2p/{text}")
    assert maddr.value_for_protocol("p2p") == text
    assert PeerID.from_base58(text) == identity.peer_id
    assert PeerID(identity.peer_id.to_bytes()) == identity.peer_id
    assert identity.peer_id.public_key_bytes == identity.public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert identity.peer_id.short() == "..." + text[-6:]


def test_peer_ids_are_ordered_and_hashable() -> None:
    a, b = Identity.from_seed(b"\x01" * 32).peer_id, Identity.from_seed(b"\x02" * 32).peer_id
    assert len({a, b, PeerID(a.to_bytes())}) == 2
    assert (a < b) != (b < a)


def test_sign_and_verify() -> None:
    identity = Identity.from_seed(b"\x03" * 32)
    signature = identity.sign(b"data")
    assert identity.peer_id.verify(signature, b"data")
    assert not identity.peer_id.verify(signature, b"other")
    assert not identity.peer_id.verify(signature[:10], b"data")
    assert not Identity.from_seed(b"\x04" * 32).peer_id.verify(signature, b"data")


def test_verified_signatures_are_cached_and_only_exact_triples_hit() -> None:
    identity, other = Identity.from_seed(b"\x51" * 32), Identity.from_seed(b"\x52" * 32)
    signature = identity.sign(b"record")
    calls = []
    real = PeerID.public_key

    class Counting:
        def __init__(self, peer: PeerID) -> None:
            self.key = real(peer)

        def verify(self, sig: bytes, data: bytes) -> None:
            calls.append(data)
            self.key.verify(sig, data)

    with mock.patch.object(PeerID, "public_key", lambda peer: Counting(peer)):
        assert identity.peer_id.verify(signature, b"record")
        assert identity.peer_id.verify(bytearray(signature), memoryview(b"record"))  # cached: no second check
        assert calls == [b"record"]
        # a cached success never stands in for another key, signature or message: each of these is checked
        assert not other.peer_id.verify(signature, b"record")
        assert not identity.peer_id.verify(signature, b"record!")
        assert not identity.peer_id.verify(bytes(64), b"record")
        assert not identity.peer_id.verify(signature, b"record!")  # failures are never cached
    assert len(calls) == 5


def test_bad_peer_ids_are_rejected() -> None:
    with pytest.raises(IdentityError, match="not valid base58"):
        PeerID.from_base58("0OIl")
    with pytest.raises(IdentityError, match="not an Ed25519 PeerID"):
        PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # a sha256 (RSA-style) PeerID
    with pytest.raises(IdentityError):
        PeerID.from_public_key(b"short")
    with pytest.raises(IdentityError):
        Identity.from_seed(b"short")


def test_key_file_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.pem"
    created = Identity.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Identity.load_or_create(path).peer_id == created.peer_id
    assert Identity.load(path).private_bytes_raw() == created.private_bytes_raw()
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_bad_key_files_give_clear_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(IdentityError, match="cannot read identity file"):
        Identity.load(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(os.urandom(100))
    with pytest.raises(IdentityError, match="not an unencrypted PEM private key"):
        Identity.load(garbage)
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        Identity.load(ec)
    loose = tmp_path / "loose.pem"
    Identity.generate().save(loose)
    loose.chmod(0o644)
    Identity.load(loose)
    assert "should be 0600" in caplog.text
