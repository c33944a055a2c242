"""Node identity: an Ed25519 key pair and its libp2p-compatible PeerID.

The PeerID is the identity multihash of the protobuf-encoded Ed25519 public key,
``00 24 08 01 12 20 <32-byte key>``, printed in base58 (``12D3KooW...``), exactly as libp2p does,
so that ``/ip4/127.0.0.1/tcp/31337/p2p/<PeerID>`` parses with the ``multiaddr`` package.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from functools import total_ordering
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.errors import IdentityError

log = logging.getLogger(__name__)

# multihash identity (0x00), length 36 (0x24); protobuf PublicKey{Type=Ed25519 (08 01), Data (12 20 ...)}
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
PEER_ID_SIZE_BYTES = len(_PEER_ID_PREFIX) + 32
SIGNATURE_SIZE_BYTES = 64
_VERIFIED_CACHE_SIZE = 8192


@functools.lru_cache(maxsize=8192)
def _b58encode(raw: bytes) -> str:
    """Base58 is pure Python and PeerIDs are printed and parsed on every record and RPC: both are cached."""
    return base58.b58encode(raw).decode("ascii")


@functools.lru_cache(maxsize=8192)
def _b58decode_cached(text: str) -> bytes:
    return base58.b58decode(text)  # a ValueError is raised, never cached


def _b58decode(text: str) -> bytes:
    # a PeerID prints as 52 characters: longer text (from a peer) is decoded, and refused, without a cache entry
    return _b58decode_cached(text) if len(text) <= 64 else base58.b58decode(text)


class _VerifiedSignatures:
    """The (public key, signature, data) triples that verified, as SHA-256 digests, the newest ``size`` kept.

    DHT records are re-read every poll and each read re-checks every owner's signature; an Ed25519 verification
    costs ~60 us against ~1 us for the digest of a small record. Only successes are kept, and a hit needs the
    exact triple, so the cache can never accept what a verification would refuse. Thread-safe.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(peer: bytes, signature: bytes, data: bytes) -> bytes:
        return hashlib.sha256(peer + signature + data).digest()  # peer and signature have fixed sizes

    def __contains__(self, digest: bytes) -> bool:
        with self._lock:
            if digest in self._digests:
                self._digests.move_to_end(digest)
                return True
            return False

    def add(self, digest: bytes) -> None:
        with self._lock:
            self._digests[digest] = None
            if len(self._digests) > self._size:
                self._digests.popitem(last=False)


_verified = _VerifiedSignatures(_VERIFIED_CACHE_SIZE)


@total_ordering
class PeerID:
    """A peer's identity: the multihash of its Ed25519 public key. Immutable and hashable."""

    __slots__ = ("_b58", "_bytes")

    def __init__(self, raw: bytes) -> None:
        raw = bytes(raw)
        if len(raw) != PEER_ID_SIZE_BYTES or not raw.startswith(_PEER_ID_PREFIX):
            raise IdentityError(
                f"not an Ed25519 PeerID ({len(raw)} bytes); expected the identity multihash of an "
                "Ed25519 public key (base58 form starts with 12D3KooW)"
            )
        self._bytes = raw
        self._b58 = _b58encode(raw)

    @classmethod
    def from_public_key(cls, key: Ed25519PublicKey | bytes) -> PeerID:
        """The PeerID of an Ed25519 public key (a key object or its 32 raw bytes)."""
        if isinstance(key, Ed25519PublicKey):
            key = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if len(key) != 32:
            raise IdentityError(f"an Ed25519 public key has 32 bytes, got {len(key)}")
        return cls(_PEER_ID_PREFIX + bytes(key))

    @classmethod
    def from_base58(cls, text: str) -> PeerID:
        """Parse the printed form, ``12D3KooW...``."""
        try:
            raw = _b58decode(text.strip())
        except ValueError as e:
            raise IdentityError(f"PeerID {text!r} is not valid base58: {e}") from None
        return cls(raw)

    def to_bytes(self) -> bytes:
        return self._bytes

    def to_base58(self) -> str:
        return self._b58

    def short(self) -> str:
        """A short form for log lines: the last 6 characters."""
        return "..." + self._b58[-6:]

    @property
    def public_key_bytes(self) -> bytes:
        return self._bytes[len(_PEER_ID_PREFIX) :]

    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public_key_bytes)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this peer's Ed25519 signature of ``data``."""
        if len(signature) != SIGNATURE_SIZE_BYTES:
            return False
        signature, data = bytes(signature), bytes(data)
        digest = _verified.digest(self._bytes, signature, data)
        if digest in _verified:
            return True
        try:
            self.public_key().verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        _verified.add(digest)
        return True

    def __str__(self) -> str:
        return self._b58

    def __repr__(self) -> str:
        return f"PeerID({self._b58})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerID) and other._bytes == self._bytes

    def __lt__(self, other: PeerID) -> bool:
        return self._bytes < other._bytes

    def __hash__(self) -> int:
        return hash(self._bytes)


class Identity:
    """A node's Ed25519 private key and the PeerID derived from it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.peer_id = PeerID.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from 32 bytes (tests and demos only)."""
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed has 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    def private_bytes_raw(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as unencrypted PKCS#8 PEM with mode 0600 (atomically: write, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a PEM Ed25519 private key; a clear IdentityError if it is missing or not Ed25519."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise IdentityError(f"cannot read identity file {path}: {e.strerror}; check the path") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(
                f"identity file {path} is not an unencrypted PEM private key ({e}); "
                "delete it to create a new identity, or pass --identity with a valid key"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity file {path} holds a {type(key).__name__}, not an Ed25519 key")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("identity file %s has mode %o; it should be 0600", path, mode)
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at ``path``, creating and saving a new one on first start."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        log.info("created new identity %s in %s", identity.peer_id, path)
        return identity
