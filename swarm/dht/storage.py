"""Expiring record storage with byte budgets: the :class:`RecordStorage` Protocol and :class:`MemoryStorage`.

One key ID holds either one plain record (subkey None) or a dictionary of subkey records. Merge rules:

- for one (key, subkey) the selected version wins (by default the later expiration);
- a plain value and a dictionary replace each other when the newcomer outlives everything it replaces, except
  that a dictionary holding an owned (owner-signed) subkey is never replaced by a plain value, and an owned
  subkey always replaces a plain value;
- a key holds at most ``max_subkeys_per_key`` subkeys: a new subkey of a full key takes the place of an
  unowned one if it is owned, else of the sender holding the most subkeys of that key (if it would then still
  hold fewer), else it is refused.

Limits: ``budget_bytes`` in all (see :mod:`swarm.dht.budget` for what a record costs and the eviction order),
``max_share_per_source`` and ``max_share_per_host`` of it for one sending PeerID and one source IP (refused
beyond), and the record counts ``max_records`` and ``max_records_per_source`` (refused beyond). Expired records
are never returned and are dropped lazily (an expiry heap).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol

from swarm.dht.budget import Held, Ledger, record_size_bytes
from swarm.dht.records import Record, record_owner
from swarm.errors import ConfigError, RecordError
from swarm.p2p.budget import source_of
from swarm.p2p.identity import PeerID
from swarm.configs import Config, setting


class RecordStorage(Protocol):
    """Where a node keeps the records it is responsible for (or caches)."""

    def put(self, key_id: int, record: Record, *, source: PeerID | None = None, host: str | None = None) -> bool:
        """Store ``record`` under ``key_id`` if it wins over what is there and fits; True if it was stored.

        ``source`` is the sending peer and ``host`` its IP address (both None for this node's own records).
        """
        ...

    def get(self, key_id: int) -> list[Record]:
        """The unexpired records under ``key_id`` (one plain record, or the dictionary's subkeys)."""
        ...

    def key_ids(self) -> list[int]:
        """Every key ID holding at least one unexpired record."""
        ...

    def remove_expired(self) -> int:
        """Drop expired records; return how many."""
        ...

    def prefer(self, prefixes: Iterable[str]) -> None:
        """Keys starting with one of ``prefixes`` are evicted last (replaces the previous set)."""
        ...

    def __len__(self) -> int: ...


def _later(current: Record, candidate: Record) -> Record:
    return candidate if candidate.expiration_time > current.expiration_time else current


class StorageConfig(Config, section="storage"):
    """Limits of one :class:`MemoryStorage` (sizes in bytes, shares as fractions of ``budget_bytes``)."""

    max_records: int = setting(default=100_000, ge=1, doc="Most records stored.")
    max_records_per_source: int = setting(default=10_000, ge=1, doc="Most records stored for one source peer.")
    budget_bytes: int = setting(default=64 * 1024 * 1024, ge=1, doc="Bytes all stored records may take together.")
    max_share_per_source: float = setting(
        default=0.125, gt=0, le=1, doc="Share of budget_bytes one sending PeerID may hold."
    )
    max_share_per_host: float = setting(default=0.25, gt=0, le=1, doc="Share of budget_bytes one source IP may hold.")
    max_subkeys_per_key: int = setting(default=1024, ge=1, doc="Most subkeys one key holds.")
    preferred_prefixes: tuple[str, ...] = setting(default=(), doc="Keys starting with one of these are evicted last.")

    def validate(self) -> None:
        check_prefixes(f"{self.section}.preferred_prefixes", self.preferred_prefixes)


def check_prefixes(name: str, prefixes: object) -> tuple[str, ...]:
    """``prefixes`` as a tuple of non-empty strings; ConfigError naming ``name`` otherwise."""
    if isinstance(prefixes, str) or not isinstance(prefixes, Iterable):
        raise ConfigError(f"{name} must be a sequence of key prefixes (strings), got {prefixes!r}")
    result = tuple(prefixes)
    if not all(isinstance(p, str) and p for p in result):
        raise ConfigError(f"{name} must hold non-empty strings, got {result!r}")
    return result


def is_owned(record: Record) -> bool:
    """True if the key or subkey names an owner (so the record carries that owner's checked signature)."""
    try:
        return record_owner(record) is not None
    except RecordError:
        return False  # an ambiguous owner never passes the checker, so it is never stored


class MemoryStorage:
    """In-memory :class:`RecordStorage` with an expiry heap, byte budgets and per-sender shares."""

    def __init__(
        self,
        config: StorageConfig,
        *,
        clock: Callable[[], float],
        select: Callable[[Record, Record], Record] = _later,
    ) -> None:
        self.config = config
        self._clock = clock
        self._select = select
        self._data: dict[int, dict[bytes | None, Held]] = {}
        self._ledger = Ledger()
        self._expiry: list[tuple[float, int, Held]] = []  # (until, seq, held); stale entries are skipped
        self._seq = itertools.count()
        self._prefixes: tuple[str, ...] = ()
        self._byte_prefixes: tuple[bytes, ...] = ()
        self.prefer(config.preferred_prefixes)

    def __len__(self) -> int:
        self.remove_expired()
        return self._ledger.count

    @property
    def size_bytes(self) -> int:
        """What every held record costs together (see :func:`~swarm.dht.budget.record_size_bytes`)."""
        return self._ledger.total_bytes

    def put(
        self,
        key_id: int,
        record: Record,
        *,
        source: PeerID | None = None,
        host: str | None = None,
        keep_until: float | None = None,
    ) -> bool:
        """Store ``record`` if it wins and fits; ``keep_until`` drops it before its expiration (a cached copy)."""
        now = self._clock()
        until = record.expiration_time if keep_until is None else min(record.expiration_time, keep_until)
        if not until > now:
            return False
        self.remove_expired()
        entry = self._data.get(key_id, {})
        current = entry.get(record.subkey)
        if current is not None and self._select(current.record, record) is not record:
            return False  # what is there wins (the common case of a re-store: decided before any parsing)
        owned = is_owned(record)
        replaced = self._replaced(entry, record, owned, source)
        if replaced is None:
            return False
        held = Held(
            record=record,
            key_id=key_id,
            size_bytes=record_size_bytes(record),
            source=source,
            host=source_of(host) if source is not None and host is not None else None,  # an IPv6 /64 as one
            owned=owned,
            preferred=self._is_preferred(record),
            until=until,
            seq=next(self._seq),
        )
        if not self._within_sender_share(held, replaced):
            return False
        victims: list[Held] = []
        deficit = self._ledger.total_bytes - sum(h.size_bytes for h in replaced) + held.size_bytes
        deficit -= self.config.budget_bytes
        if deficit > 0:
            planned = self._ledger.plan_eviction(deficit, held, replaced)
            if planned is None:
                return False
            victims = planned
        if not self._within_host_share(held, [*replaced, *victims]):
            return False
        for old in [*replaced, *victims]:
            self._drop(old)
        self._data.setdefault(key_id, {})[record.subkey] = held
        self._ledger.add(held)
        heapq.heappush(self._expiry, (held.until, held.seq, held))
        return True

    def _replaced(
        self, entry: dict[bytes | None, Held], record: Record, owned: bool, source: PeerID | None
    ) -> list[Held] | None:
        """What ``record`` replaces under its key; None if it is refused by the merge rules."""
        if record.subkey is None:
            current = entry.get(None)
            if current is not None:
                return [current] if self._select(current.record, record) is record else None
            if not entry:
                return []
            if any(h.owned for h in entry.values()):
                return None  # owner-signed subkeys are never replaced by a plain value
            if max(h.record.expiration_time for h in entry.values()) >= record.expiration_time:
                return None  # a dictionary that outlives this plain value stays
            return list(entry.values())
        plain = entry.get(None)
        if plain is not None:
            if not owned and plain.record.expiration_time >= record.expiration_time:
                return None
            return [plain]  # an owned subkey always replaces a plain value
        current = entry.get(record.subkey)
        if current is not None:
            return [current] if self._select(current.record, record) is record else None
        if len(entry) < self.config.max_subkeys_per_key:
            return []
        victim = _subkey_victim(list(entry.values()), owned, source)
        return None if victim is None else [victim]

    def _within_sender_share(self, held: Held, replaced: list[Held]) -> bool:
        ledger, cfg = self._ledger, self.config
        if ledger.count - len(replaced) + 1 > cfg.max_records:
            return False
        if held.source is None:
            return True
        mine = [h for h in replaced if h.source == held.source]
        if ledger.source_count[held.source] - len(mine) + 1 > cfg.max_records_per_source:
            return False
        cap = math.floor(cfg.max_share_per_source * cfg.budget_bytes)
        return ledger.source_bytes[held.source] - sum(h.size_bytes for h in mine) + held.size_bytes <= cap

    def _within_host_share(self, held: Held, leaving: list[Held]) -> bool:
        if held.host is None:
            return True
        cap = math.floor(self.config.max_share_per_host * self.config.budget_bytes)
        from_host = sum(h.size_bytes for h in leaving if h.host == held.host)
        return self._ledger.host_bytes[held.host] - from_host + held.size_bytes <= cap

    def _drop(self, held: Held) -> None:
        entry = self._data.get(held.key_id)
        if entry is None or entry.get(held.record.subkey) is not held:
            return
        del entry[held.record.subkey]
        if not entry:
            del self._data[held.key_id]
        self._ledger.remove(held)

    def remove_expired(self) -> int:
        """Drop every record whose time has passed; return how many were dropped."""
        now = self._clock()
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, _, held = heapq.heappop(self._expiry)
            entry = self._data.get(held.key_id)
            if entry is not None and entry.get(held.record.subkey) is held:
                self._drop(held)
                dropped += 1
        return dropped

    def clear(self) -> None:
        """Forget every record (as a restarted node would)."""
        self._data.clear()
        self._expiry.clear()
        self._ledger = Ledger()

    def get(self, key_id: int) -> list[Record]:
        self.remove_expired()
        now = self._clock()
        return [h.record for h in self._data.get(key_id, {}).values() if h.until > now]

    def key_ids(self) -> list[int]:
        self.remove_expired()
        return list(self._data)

    def prefer(self, prefixes: Iterable[str]) -> None:
        """Keys starting with one of ``prefixes`` are evicted last; re-sorts what is held (replaces the set)."""
        self._prefixes = check_prefixes("prefixes", prefixes)
        self._byte_prefixes = tuple(p.encode() for p in self._prefixes)
        for entry in self._data.values():
            for held in entry.values():
                preferred = self._is_preferred(held.record)
                if preferred != held.preferred:
                    self._ledger.remove(held)
                    held.preferred = preferred
                    self._ledger.add(held)

    def _is_preferred(self, record: Record) -> bool:
        if not self._prefixes:
            return False
        key = record.unpacked_key()
        if isinstance(key, str):
            return key.startswith(self._prefixes)
        return isinstance(key, bytes) and key.startswith(self._byte_prefixes)

    def count_from(self, source: PeerID) -> int:
        """How many stored records ``source`` placed here."""
        return self._ledger.source_count.get(source, 0)

    def bytes_from(self, source: PeerID | None) -> int:
        """What the records ``source`` placed here cost (None: this node's own)."""
        return self._ledger.source_bytes.get(source, 0)

    def bytes_from_host(self, host: str) -> int:
        """What the records sent from IP address ``host`` (an IPv6 address: from its /64) cost."""
        return self._ledger.host_bytes.get(source_of(host), 0)


def _subkey_victim(held: list[Held], owned: bool, source: PeerID | None) -> Held | None:
    """The subkey a new subkey of a full key takes the place of (soonest-expiring of its group), or None."""
    if owned:
        unowned = [h for h in held if not h.owned]
        if unowned:
            return min(unowned, key=lambda h: (h.until, h.seq))
    peers = [h for h in held if h.owned == owned]
    counts = Counter(h.source for h in peers)
    if not counts:
        return None
    heaviest, most = max(counts.items(), key=lambda pair: pair[1])
    if most <= counts[source] + 1:
        return None  # no sender holds more of this key than the newcomer's would
    return min((h for h in peers if h.source == heaviest), key=lambda h: (h.until, h.seq))
