"""DHT records: values with absolute expiration, dictionary subkeys, owned (signed) records, validators.

A :class:`Record` travels in msgpack form: ``key``, ``subkey`` and ``value`` are the msgpack bytes of the
user's objects, so every node signs and checks exactly the same bytes. ``subkey`` is None for a plain
value; a key holding subkeys is a *dictionary value* whose subkeys expire independently.

A key or subkey containing ``[owner:<PeerID base58>]`` (see `swarm.dht.keys.owner_subkey`) is *owned*: it is
accepted only with that PeerID's Ed25519 signature over (key, subkey, value, expiration_time). Every
node checks this on STORE and on the answers it receives, through :class:`RecordChecker`.

Validators (:class:`RecordValidator`) add schemas: ``validate`` rejects a record by raising
:class:`~swarm.errors.RecordError`; ``select`` picks between two versions of the same (key, subkey),
returning None to leave it to the default rule (the later expiration wins).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from swarm.dht.keys import OWNER_MARKER, OWNER_MARKER_BYTES
from swarm.errors import IdentityError, ProtocolError, RecordError
from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.messages import Message, packb, unpackb

_SIGNING_DOMAIN = "swarm-dht-record-v1"


@dataclass(frozen=True)
class ValueWithExpiration:
    """A value found in the DHT and its absolute expiration time (seconds since the epoch)."""

    value: Any
    expiration_time: float


@dataclass(frozen=True, kw_only=True)
class Record(Message):
    """One stored (key, subkey) -> value, in the msgpack form that is signed and sent."""

    key: bytes
    subkey: bytes | None = None
    value: bytes
    expiration_time: float
    signature: bytes = b""

    def signing_payload(self) -> bytes:
        """The bytes an owner signs: domain, key, subkey, value and expiration."""
        return packb([_SIGNING_DOMAIN, self.key, self.subkey, self.value, float(self.expiration_time)])

    def slot(self) -> tuple[bytes, bytes | None]:
        """What a newer version replaces: the (key, subkey) pair."""
        return (self.key, self.subkey)

    def unpacked_key(self) -> Any:
        return unpackb(self.key)

    def unpacked_subkey(self) -> Any:
        return None if self.subkey is None else unpackb(self.subkey)

    def unpacked_value(self) -> Any:
        return unpackb(self.value)

    def with_value(self) -> ValueWithExpiration:
        return ValueWithExpiration(self.unpacked_value(), self.expiration_time)


def make_record(
    key: str | bytes,
    value: Any,
    expiration_time: float,
    subkey: Any = None,
    *,
    identity: Identity | None = None,
) -> Record:
    """Pack a record; sign it with ``identity`` when the key or subkey names that identity as owner."""
    if not isinstance(key, (str, bytes)):
        raise RecordError(f"a DHT key must be str or bytes, got {type(key).__name__}")
    try:
        value_bytes = packb(value)
        subkey_bytes = None if subkey is None else packb(subkey)
    except (TypeError, ValueError) as e:
        raise RecordError(f"value or subkey is not msgpack-serializable: {e}; use plain data") from None
    record = Record(key=packb(key), subkey=subkey_bytes, value=value_bytes, expiration_time=float(expiration_time))
    owner = record_owner(record)
    if owner is None:
        return record
    if identity is None or identity.peer_id != owner:
        raise RecordError(
            f"the key or subkey is owned by {owner.short()}; only that peer's identity can sign it "
            "(pass the owner's identity, or drop the [owner:...] marker)"
        )
    return Record(**{**record.to_wire(), "signature": identity.sign(record.signing_payload())})


def _owners_in(packed: bytes | None) -> set[str]:
    if packed is None:
        return set()
    obj = unpackb(packed)
    if isinstance(obj, str):
        return set(OWNER_MARKER.findall(obj))
    if isinstance(obj, bytes):
        return {m.decode("ascii") for m in OWNER_MARKER_BYTES.findall(obj)}
    return set()


def record_owner(record: Record) -> PeerID | None:
    """The PeerID named by ``[owner:...]`` in the key or subkey; None if unowned; RecordError if ambiguous."""
    try:
        names = _owners_in(record.key) | _owners_in(record.subkey)
    except ProtocolError as e:
        raise RecordError(f"record key or subkey is not valid msgpack: {e}") from None
    if not names:
        return None
    if len(names) > 1:
        raise RecordError(f"a record may name one owner, this one names {len(names)}")
    try:
        return PeerID.from_base58(names.pop())
    except IdentityError as e:
        raise RecordError(f"the owner marker does not name a valid PeerID: {e}") from None


class RecordValidator(Protocol):
    """A schema hook: reject bad records, choose between two versions of one (key, subkey)."""

    def validate(self, record: Record) -> None:
        """Raise RecordError if ``record`` is not acceptable."""
        ...

    def select(self, current: Record, candidate: Record) -> Record | None:
        """The version to keep, or None to leave it to the default rule (later expiration wins)."""
        ...


class OwnerSignatureValidator:
    """Accept an owned record only with its owner's signature; unowned records pass."""

    def validate(self, record: Record) -> None:
        owner = record_owner(record)
        if owner is None:
            return
        if not record.signature:
            raise RecordError(f"record owned by {owner.short()} carries no signature")
        if not owner.verify(record.signature, record.signing_payload()):
            raise RecordError(f"record owned by {owner.short()} has a bad signature (forged or tampered)")

    def select(self, current: Record, candidate: Record) -> Record | None:
        return None


@dataclass(frozen=True, kw_only=True)
class RecordChecker:
    """Every check a record passes before it is stored or returned: shape, limits, expiry, owner, schemas."""

    validators: Sequence[RecordValidator] = ()
    max_key_size_bytes: int = 1024
    max_value_size_bytes: int = 64 * 1024
    max_ttl_s: float = 7 * 86400.0
    clock_skew_s: float = 30.0
    clock: Callable[[], float] = time.time

    def check(self, record: Record) -> None:
        """Raise RecordError unless ``record`` may be stored or returned now."""
        if len(record.key) > self.max_key_size_bytes or len(record.subkey or b"") > self.max_key_size_bytes:
            raise RecordError(f"key or subkey longer than max_key_size_bytes={self.max_key_size_bytes}")
        if len(record.value) > self.max_value_size_bytes:
            raise RecordError(
                f"value of {len(record.value)} bytes exceeds max_value_size_bytes={self.max_value_size_bytes}"
            )
        try:
            key = record.unpacked_key()
            subkey = record.unpacked_subkey()
            record.unpacked_value()
        except ProtocolError as e:
            raise RecordError(f"record is not valid msgpack: {e}") from None
        if not isinstance(key, (str, bytes)):
            raise RecordError(f"a DHT key must be str or bytes, got {type(key).__name__}")
        if subkey is not None and not isinstance(subkey, (str, bytes, int)):
            raise RecordError(f"a subkey must be str, bytes or int, got {type(subkey).__name__}")
        self.check_expiration(record.expiration_time)
        OwnerSignatureValidator().validate(record)
        for validator in self.validators:
            validator.validate(record)

    def check_expiration(self, expiration_time: float) -> None:
        now = self.clock()
        if not math.isfinite(expiration_time) or expiration_time <= now:
            raise RecordError(f"record expired at {expiration_time:.3f} (now {now:.3f})")
        if expiration_time > now + self.max_ttl_s + self.clock_skew_s:
            raise RecordError(
                f"expiration {expiration_time - now:.0f} s ahead exceeds max_ttl_s={self.max_ttl_s:.0f} "
                f"(+ clock_skew_s={self.clock_skew_s:.0f}); check the clocks or use a shorter ttl"
            )

    def select(self, current: Record, candidate: Record) -> Record:
        """The version of one (key, subkey) to keep: validators first, else the later expiration."""
        for validator in self.validators:
            chosen = validator.select(current, candidate)
            if chosen is not None:
                return chosen
        return candidate if candidate.expiration_time > current.expiration_time else current
