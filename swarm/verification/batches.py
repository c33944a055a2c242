"""Per-window batches of signed items (receipts, verdicts) in the DHT, split into parts that fit one record.

A publisher's batch for a window is stored as parts ``0..num_parts-1`` under subkeys
``[owner:<PeerID>]#<part>`` of ``{run}/<kind>/{window}``; each part is at most ``MAX_PART_BYTES`` packed (the
DHT's default value limit is 64 KiB). Readers merge a publisher's parts back into one batch and drop, with a
warning, anything malformed, mislabelled, stored under another owner's subkey, or incomplete.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, Self, TypeVar

from swarm.p2p.identity import PeerID
from swarm.p2p.messages import Message, packb
from swarm.errors import RecordError
from swarm.dht.keys import OWNER_PART_SUBKEY, KeyPattern, part_subkey
from swarm.dht.schema import RecordKind, RecordSchema
from swarm.verification.common import MAX_RECORD_TTL_S, RecordStore, record_items

log = logging.getLogger(__name__)

MAX_PART_BYTES = 48 * 1024


class BatchMessage(Protocol):
    """What a batch message (ReceiptBatch, VerdictBatch) has: its label, publisher and part numbering."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @property
    def run_id(self) -> str: ...

    @property
    def window(self) -> int: ...

    @property
    def publisher(self) -> bytes: ...

    @property
    def part(self) -> int: ...

    @property
    def num_parts(self) -> int: ...

    def pack(self) -> bytes: ...

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, *, max_size_bytes: int = ...) -> Self: ...


B = TypeVar("B", bound=BatchMessage)


def split_batch(batch: B, items_field: str, max_part_bytes: int = MAX_PART_BYTES) -> list[B]:
    """``batch`` as parts of at most ``max_part_bytes`` packed each (numbered, with ``num_parts`` set)."""
    items: Sequence[Message] = getattr(batch, items_field)
    groups: list[list[Message]] = [[]]
    size = len(dataclasses.replace(batch, **{items_field: []}).pack()) + 16
    for item in items:
        item_size = len(packb(item.to_wire()))
        if groups[-1] and size + item_size > max_part_bytes:
            groups.append([])
            size = len(dataclasses.replace(batch, **{items_field: []}).pack()) + 16
        groups[-1].append(item)
        size += item_size
    return [
        dataclasses.replace(batch, **{items_field: group, "part": i, "num_parts": len(groups)})
        for i, group in enumerate(groups)
    ]


async def publish_batch(
    store: RecordStore, key: str, batch: BatchMessage, items_field: str, expiration_time: float
) -> bool:
    """Store every part of ``batch`` under its publisher's part subkeys; True if all were stored."""
    publisher = PeerID(batch.publisher)
    ok = True
    for part in split_batch(batch, items_field):
        ok &= bool(await store.store(key, part.pack(), expiration_time, subkey=part_subkey(publisher, part.part)))
    return ok


def merge_batches(
    result: Any,
    schema: RecordSchema,
    cls: type[B],
    items_field: str,
    run_id: str,
    window: int,
    check: Callable[[B], str | None],
) -> dict[PeerID, B]:
    """Whole batches, by publisher, from a DHT ``get`` answer (see the module docstring for what is dropped).

    Each part's value is read with the key's ``schema``, as every node checks it on STORE."""
    parts: dict[PeerID, dict[int, B]] = {}
    for subkey, raw in record_items(result):
        try:
            batch = schema.parse_value(raw)
            if not isinstance(batch, cls):
                raise RecordError(f"expected a {cls.__name__}, got a {type(batch).__name__}")
        except RecordError as e:
            log.warning("dropping a malformed %s part for %s window %d: %s", cls.__name__, run_id, window, e)
            continue
        publisher = PeerID(batch.publisher)
        problem = None
        if subkey != part_subkey(publisher, batch.part):
            problem = f"stored under subkey {subkey!r}, not its own"
        elif batch.run_id != run_id or batch.window != window:
            problem = f"labelled {batch.run_id}/{batch.window}"
        else:
            problem = check(batch)
        if problem is not None:
            log.warning("dropping %s part of %s: %s", cls.__name__, publisher.short(), problem)
            continue
        parts.setdefault(publisher, {})[batch.part] = batch
    merged: dict[PeerID, B] = {}
    for publisher, found in sorted(parts.items()):
        num_parts = found[0].num_parts if 0 in found else 0
        complete = [found[i] for i in range(num_parts) if i in found]
        if num_parts == 0 or len(complete) != num_parts or any(p.num_parts != num_parts for p in complete):
            log.warning("dropping incomplete %s of %s for window %d", cls.__name__, publisher.short(), window)
            continue
        items = [item for p in complete for item in getattr(p, items_field)]
        merged[publisher] = dataclasses.replace(complete[0], **{items_field: items, "part": 0, "num_parts": 1})
    return merged


def batch_schema(key: KeyPattern, batch_type: type[Message]) -> RecordSchema:
    """The schema of a key of batches in parts (receipts, verdicts): owner-signed ``[owner:<PeerID>]#<part>``
    subkeys, each the packed bytes of one part of ``batch_type``, kept at most `MAX_RECORD_TTL_S`."""
    return RecordSchema(
        key=key,
        kind=RecordKind.OWNED,
        subkey=OWNER_PART_SUBKEY,
        value_types=(batch_type,),
        packed=True,
        max_ttl_s=MAX_RECORD_TTL_S,
    )
