"""Shared helpers of the verification layer: digests, canonical signing bodies, DHT record access."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from swarm.p2p.identity import PeerID
from swarm.p2p.messages import packb
from swarm.errors import IdentityError, ProtocolError, VerificationError

DIGEST_SIZE_BYTES = 32
MAX_RECORD_TTL_S = 7 * 86400.0  # receipts, verdicts, outlier reports, attestations: the audit trail lives a week
MAX_HEARTBEAT_TTL_S = 86400.0  # ``{run}/orchestrator`` heartbeats (ElectionConfig.heartbeat_ttl_s's bound)


def digest_parts(parts: Sequence[bytes]) -> bytes:
    """SHA-256 over length-prefixed byte strings: the hash of a microbatch's wire payloads."""
    h = hashlib.sha256()
    h.update(len(parts).to_bytes(4, "big"))
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def signing_body(domain: bytes, fields: Mapping[str, Any]) -> bytes:
    """The exact bytes a signature covers: a domain tag, then the msgpack of the fields sorted by name."""
    return domain + packb(sorted(fields.items()))


def peer_from_bytes(raw: bytes, what: str) -> PeerID:
    """Parse a PeerID carried in a message; ProtocolError (a bad message) if it is not one."""
    try:
        return PeerID(raw)
    except IdentityError as e:
        raise ProtocolError(f"{what}: {e}") from None


def check_digest(value: bytes, what: str) -> None:
    """Raise ValueError (turned into ProtocolError by Message.from_wire) if ``value`` is not a SHA-256."""
    if len(value) != DIGEST_SIZE_BYTES:
        raise ValueError(f"{what} must be a {DIGEST_SIZE_BYTES}-byte SHA-256 digest, got {len(value)} bytes")


class RecordStore(Protocol):
    """Where signed records live: the subset of `dht.DHT` this layer uses (a DHT satisfies it)."""

    async def store(self, key: str, value: Any, expiration_time: float, subkey: str | None = None) -> bool: ...

    async def get(self, key: str, latest: bool = False) -> Any: ...


def record_values(result: Any) -> list[Any]:
    """The plain values of a `get` answer: a dict of subkey -> value-with-expiration, one value, or None."""
    if result is None:
        return []
    items: Iterable[Any] = result.values() if isinstance(result, dict) else [result]
    return [getattr(item, "value", item) for item in items]


def record_items(result: Any) -> list[tuple[Any, Any]]:
    """(subkey, plain value) pairs of a `get` answer; the subkey is None for a value stored without one."""
    if result is None:
        return []
    if isinstance(result, dict):
        return [(subkey, getattr(item, "value", item)) for subkey, item in result.items()]
    return [(None, getattr(result, "value", result))]


def require(condition: bool, message: str) -> None:
    """Raise VerificationError(message) unless ``condition`` holds."""
    if not condition:
        raise VerificationError(message)
