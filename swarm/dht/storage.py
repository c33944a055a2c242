"""Expiring record storage with limits: the :class:`RecordStorage` Protocol and :class:`MemoryStorage`.

One key ID holds either one plain record (subkey None) or a dictionary of subkey records. A plain value
and a dictionary replace each other when the newcomer expires later than everything it replaces. Expired
records are never returned and are dropped lazily (an expiry heap). Limits: ``max_records`` in all, and
``max_records_per_source`` placed by any one remote peer, so no peer can fill a node's memory.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from swarm.p2p.identity import PeerID
from swarm.dht.records import Record
from swarm.configs import Config, setting

Slot = tuple[int, bytes | None]  # (key ID, packed subkey or None)


class RecordStorage(Protocol):
    """Where a node keeps the records it is responsible for (or caches)."""

    def put(self, key_id: int, record: Record, *, source: PeerID | None = None) -> bool:
        """Store ``record`` under ``key_id`` if it wins over what is there; True if it was stored."""
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

    def __len__(self) -> int: ...


def _later(current: Record, candidate: Record) -> Record:
    return candidate if candidate.expiration_time > current.expiration_time else current


class StorageConfig(Config, section="storage"):
    """Limits of one :class:`MemoryStorage`."""

    max_records: int = setting(default=100_000, ge=1, doc="Most records stored.")
    max_records_per_source: int = setting(default=10_000, ge=1, doc="Most records stored for one source peer.")


class MemoryStorage:
    """In-memory :class:`RecordStorage` with an expiry heap and per-source quotas."""

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
        self._data: dict[int, dict[bytes | None, Record]] = {}
        self._source: dict[Slot, PeerID | None] = {}
        self._per_source: Counter[PeerID] = Counter()
        self._expiry: list[tuple[float, int, bytes]] = []  # (expiration, key_id, subkey or b"\0plain")
        self._size = 0

    def __len__(self) -> int:
        self.remove_expired()
        return self._size

    def put(self, key_id: int, record: Record, *, source: PeerID | None = None) -> bool:
        now = self._clock()
        if record.expiration_time <= now:
            return False
        self.remove_expired()
        entry = self._data.get(key_id, {})
        if record.subkey is None:
            replaced = list(entry)
            current = entry.get(None)
            if current is not None:
                if self._select(current, record) is not record:
                    return False
            elif entry and max(r.expiration_time for r in entry.values()) >= record.expiration_time:
                return False  # a dictionary that outlives this plain value stays
        else:
            plain = entry.get(None)
            if plain is not None and plain.expiration_time >= record.expiration_time:
                return False
            current = entry.get(record.subkey)
            if current is not None and self._select(current, record) is not record:
                return False
            replaced = [None, record.subkey] if plain is not None else [record.subkey]
        new_slots = 1 - sum(1 for s in replaced if s in entry)
        if not self._has_room(new_slots, source, key_id, record.subkey):
            return False
        for subkey in replaced:
            if subkey in entry:
                self._drop((key_id, subkey))
        self._data.setdefault(key_id, {})[record.subkey] = record
        self._source[(key_id, record.subkey)] = source
        if source is not None:
            self._per_source[source] += 1
        self._size += 1
        marker = b"\0plain" if record.subkey is None else record.subkey
        heapq.heappush(self._expiry, (record.expiration_time, key_id, marker))
        return True

    def _has_room(self, new_slots: int, source: PeerID | None, key_id: int, subkey: bytes | None) -> bool:
        if new_slots > 0 and self._size >= self.config.max_records:
            return False
        if source is None:
            return True
        already_theirs = self._source.get((key_id, subkey)) == source
        return already_theirs or self._per_source[source] < self.config.max_records_per_source

    def _drop(self, slot: Slot) -> None:
        key_id, subkey = slot
        entry = self._data.get(key_id)
        if entry is None or subkey not in entry:
            return
        del entry[subkey]
        if not entry:
            del self._data[key_id]
        source = self._source.pop(slot, None)
        if source is not None:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]
        self._size -= 1

    def remove_expired(self) -> int:
        """Drop every record whose expiration has passed; return how many were dropped."""
        now = self._clock()
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            expiration, key_id, marker = heapq.heappop(self._expiry)
            subkey = None if marker == b"\0plain" else marker
            record = self._data.get(key_id, {}).get(subkey)
            if record is not None and record.expiration_time == expiration:
                self._drop((key_id, subkey))
                dropped += 1
        return dropped

    def get(self, key_id: int) -> list[Record]:
        self.remove_expired()
        now = self._clock()
        return [r for r in self._data.get(key_id, {}).values() if r.expiration_time > now]

    def key_ids(self) -> list[int]:
        self.remove_expired()
        return list(self._data)

    def count_from(self, source: PeerID) -> int:
        """How many stored records ``source`` placed here."""
        return self._per_source.get(source, 0)
