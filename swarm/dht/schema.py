"""Typed record schemas: which kind of value each key pattern holds, its message type, and its longest lifetime.

A :class:`RecordSchema` ties a :class:`~swarm.dht.keys.KeyPattern` to

- its **kind**: one plain value (``RecordKind.VALUE``), or a dictionary whose every subkey is owned
  (``RecordKind.OWNED``: ``[owner:<PeerID>]``, or another ``subkey`` shape that names the owner, and signed
  by that PeerID, which `OwnerSignatureValidator` checks);
- its **value type**: the typed `Message` classes the value must parse as (one of them), either as the
  message's wire map or, with ``packed``, as its msgpack bytes;
- its **maximum expiration**: a record may not expire later than ``max_ttl_s`` (+ the clock skew) from now.

:class:`SchemaValidator` is the `RecordValidator` a node installs (``DHTConfig(validators=...)``): every STORE
it receives and every record it reads from a peer goes through it, and a record of a registered key that breaks
its schema is refused with a RecordError (the node logs it and keeps serving). Keys that match no schema are
not checked here. Each layer defines the schemas of its own keys (training, averaging, verification); the
node installs all of them, so this layer never imports upward.

Readers use the same schema: :meth:`RecordSchema.entries` turns a ``DHT.get`` answer into typed entries and
skips (and logs) every entry that breaks the schema.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from swarm.dht.keys import OWNER_SUBKEY, KeyPattern
from swarm.dht.records import Record, record_owner
from swarm.errors import ConfigError, IdentityError, ProtocolError, RecordError
from swarm.p2p.identity import PeerID
from swarm.p2p.messages import Message

log = logging.getLogger(__name__)


class RecordKind(enum.Enum):
    VALUE = "value"  # one plain value, stored without a subkey
    OWNED = "owned"  # a dictionary of subkeys, each owned and signed by the PeerID it names


@dataclass(frozen=True)
class Entry:
    """One checked entry of a ``get`` answer: its subkey, owner (None for a plain value), value and expiry."""

    subkey: Any
    owner: PeerID | None
    value: Message
    expiration_time: float


@dataclass(frozen=True, kw_only=True)
class RecordSchema:
    """What the keys of ``key`` hold (see the module docstring)."""

    key: KeyPattern
    kind: RecordKind
    value_types: tuple[type[Message], ...]
    max_ttl_s: float
    packed: bool = False
    subkey: re.Pattern[str] = OWNER_SUBKEY  # the whole-subkey shape of an OWNED dictionary

    def __post_init__(self) -> None:
        if not self.value_types or not all(isinstance(t, type) and issubclass(t, Message) for t in self.value_types):
            raise ConfigError(f"schema {self.key.name}: value_types must be Message classes")
        if not (isinstance(self.max_ttl_s, (int, float)) and math.isfinite(self.max_ttl_s) and self.max_ttl_s > 0):
            raise ConfigError(f"schema {self.key.name}: max_ttl_s must be a positive number of seconds")
        if "owner" not in self.subkey.groupindex:
            raise ConfigError(f"schema {self.key.name}: the subkey pattern must name the owner in a group 'owner'")

    @property
    def name(self) -> str:
        return self.key.name

    def parse_value(self, value: Any) -> Message:
        """The value as the first of ``value_types`` it parses as; RecordError if it parses as none."""
        if self.packed and not isinstance(value, (bytes, bytearray)):
            raise RecordError(f"{self.name}: the value must be packed bytes, got {type(value).__name__}")
        problems = []
        for value_type in self.value_types:
            try:
                return value_type.unpack(value) if self.packed else value_type.from_wire(value)
            except ProtocolError as e:
                problems.append(str(e))
        raise RecordError(f"{self.name}: the value is not a {self._type_names()}: {'; '.join(problems)[:300]}")

    def check_subkey(self, subkey: Any) -> PeerID | None:
        """The owner a subkey names (None for a VALUE schema's None subkey); RecordError unless it fits the kind."""
        if self.kind is RecordKind.VALUE:
            if subkey is not None:
                raise RecordError(f"{self.name} holds one plain value, not a dictionary (got subkey {subkey!r:.80})")
            return None
        if subkey is None:
            raise RecordError(f"{self.name} holds a dictionary of owner-signed subkeys; a plain value is refused")
        match = self.subkey.fullmatch(subkey) if isinstance(subkey, str) else None
        if match is None:
            raise RecordError(f"{self.name}: subkey {subkey!r:.80} is not an owner subkey of the form the key requires")
        try:
            return PeerID.from_base58(match["owner"])
        except IdentityError:
            raise RecordError(f"{self.name}: subkey {subkey!r:.80} names no valid PeerID") from None

    def check_expiration(self, expiration_time: float, now: float, clock_skew_s: float) -> None:
        if expiration_time > now + self.max_ttl_s + clock_skew_s:
            raise RecordError(
                f"{self.name}: expiration {expiration_time - now:.0f} s ahead exceeds this key's maximum of "
                f"{self.max_ttl_s:.0f} s (+ {clock_skew_s:.0f} s clock skew)"
            )

    def check(self, record: Record, *, now: float, clock_skew_s: float) -> None:
        """RecordError unless ``record`` (of a key of this schema) fits kind, owner, value type and lifetime."""
        owner = self.check_subkey(record.unpacked_subkey())
        if owner is not None and record_owner(record) != owner:  # the signature was checked for record_owner
            raise RecordError(f"{self.name}: the record is not owned by the PeerID its subkey names")
        self.check_expiration(record.expiration_time, now, clock_skew_s)
        self.parse_value(record.unpacked_value())

    def entries(self, found: Any) -> list[Entry]:
        """The entries of a ``DHT.get`` answer that fit this schema; each one that does not is logged and skipped.

        ``found`` is what ``get`` returns: None, one value-with-expiration, or a dict of subkey -> one.
        """
        if found is None:
            return []
        if self.kind is RecordKind.VALUE:
            items: Iterable[tuple[Any, Any]] = [(None, found)]
            if isinstance(found, dict):
                log.warning("%s: expected one plain value, found a dictionary of %d subkeys", self.name, len(found))
                return []
        elif isinstance(found, dict):
            items = found.items()
        else:
            log.warning("%s: expected a dictionary of owner-signed subkeys, found a plain value; skipped", self.name)
            return []
        out = []
        for subkey, item in items:
            try:
                owner = self.check_subkey(subkey)
                value = self.parse_value(getattr(item, "value", item))
            except RecordError as e:
                log.warning("skipping an entry of %s: %s", self.name, e)
                continue
            out.append(Entry(subkey, owner, value, float(getattr(item, "expiration_time", math.inf))))
        return out

    def _type_names(self) -> str:
        return " or ".join(t.__name__ for t in self.value_types)


class SchemaValidator:
    """The `RecordValidator` that checks records of registered key patterns against their schemas.

    ``clock`` and ``clock_skew_s`` bound the expiration like the node's `RecordChecker` does (pass the DHT
    config's clock). A key matched by several schemas is checked against the first one registered.
    """

    def __init__(
        self,
        schemas: Iterable[RecordSchema] = (),
        *,
        clock: Callable[[], float] = time.time,
        clock_skew_s: float = 30.0,
    ) -> None:
        self._schemas: list[RecordSchema] = []
        self.clock = clock
        self.clock_skew_s = clock_skew_s
        for schema in schemas:
            self.register(schema)

    def register(self, schema: RecordSchema) -> None:
        if any(s.name == schema.name for s in self._schemas):
            raise ConfigError(f"a schema for {schema.name} keys is registered already")
        self._schemas.append(schema)

    @property
    def schemas(self) -> tuple[RecordSchema, ...]:
        return tuple(self._schemas)

    def schema_for(self, key: Any) -> RecordSchema | None:
        """The schema of ``key`` (an unpacked key), or None if no pattern matches it."""
        return next((s for s in self._schemas if s.key.matches(key)), None)

    def validate(self, record: Record) -> None:
        try:
            key = record.unpacked_key()
        except ProtocolError as e:
            raise RecordError(f"record key is not valid msgpack: {e}") from None
        schema = self.schema_for(key)
        if schema is None:
            return
        try:
            schema.check(record, now=self.clock(), clock_skew_s=self.clock_skew_s)
        except ProtocolError as e:
            raise RecordError(f"{schema.name}: record is not valid msgpack: {e}") from None

    def select(self, current: Record, candidate: Record) -> Record | None:
        return None
