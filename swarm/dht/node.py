"""The DHT node: bootstrap, store, get, find_peers, crawl, and the maintenance that keeps the swarm healthy.

Maintenance (one owned task): drop expired records, refresh buckets not touched for ``refresh_interval_s``
(a lookup of a random ID in their range), republish this node's own records every ``republish_interval_s``
until they expire. When a new peer enters the routing table, the records it is now among the ``k`` closest
to are handed over to it. Records that ``get`` fetched from other peers are kept in this node's own cache
(``cache_on_path``, for at most ``cache_ttl_s``); nobody else decides what a node caches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from swarm.dht.config import DHTConfig
from swarm.p2p.identity import Identity, PeerID
from swarm.dht.lookup import LookupParams, LookupReply, LookupResult, iterative_lookup
from swarm.p2p.maddr import parse_maddr
from swarm.p2p.messages import packb
from swarm.dht.paging import follow_pages
from swarm.dht.protocol import DHTProtocol, RoutingTableReply
from swarm.dht.records import Record, RecordChecker, ValueWithExpiration, make_record
from swarm.dht.routing import ID_BITS, Contact, RoutingTable, key_id_of_packed, node_id_of
from swarm.dht.storage import MemoryStorage, RecordStorage, StorageConfig, check_prefixes, is_owned
from swarm.p2p import Transport
from swarm.errors import BootstrapError, ConfigError, SwarmError

log = logging.getLogger(__name__)

_FAILURES = (SwarmError, OSError, TimeoutError)


class DHT:
    """One Kademlia node. Use ``async with DHT.create(config) as dht:`` (or ``start()`` / ``shutdown()``)."""

    def __init__(
        self,
        config: DHTConfig,
        *,
        identity: Identity | None = None,
        transport: Transport | None = None,
        storage: RecordStorage | None = None,
    ) -> None:
        if transport is not None and identity is not None and transport.peer_id != identity.peer_id:
            raise ConfigError("identity: the DHT's identity differs from its transport's; pass one of them")
        self.config = config
        self.identity = identity or (transport.identity if transport is not None else Identity.generate())
        self._transport = transport
        self._owns_transport = transport is None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random(node_id_of(self.peer_id))
        self.checker = RecordChecker(
            validators=config.validators,
            max_key_size_bytes=config.max_key_size_bytes,
            max_value_size_bytes=config.max_value_size_bytes,
            max_ttl_s=config.max_ttl_s,
            clock_skew_s=config.clock_skew_s,
            clock=config.clock,
        )
        self.table = RoutingTable(node_id_of(self.peer_id), bucket_size=config.bucket_size, clock=config.clock)
        self.storage: RecordStorage = storage if storage is not None else self._memory_storage(cache=False)
        self.cache = self._memory_storage(cache=True)
        self._own: dict[tuple[bytes, bytes | None], tuple[Record, float]] = {}
        self._protocol: DHTProtocol | None = None
        self.last_lookup: LookupResult | None = None

    def _memory_storage(self, *, cache: bool) -> MemoryStorage:
        c = self.config
        max_records = c.max_cached_records if cache else c.max_records
        limits = StorageConfig(
            max_records=max_records,
            max_records_per_source=min(c.max_records_per_peer, max_records),
            budget_bytes=c.cache_budget_bytes if cache else c.storage_budget_bytes,
            max_share_per_source=c.max_share_per_peer,
            max_share_per_host=c.max_share_per_ip,
            max_subkeys_per_key=c.max_subkeys_per_key,
            preferred_prefixes=c.preferred_key_prefixes,
        )
        return MemoryStorage(limits, clock=c.clock, select=self.checker.select)

    def prefer_prefixes(self, prefixes: Iterable[str]) -> None:
        """Keep keys starting with ``prefixes`` (e.g. ``["<run_id>/", "runs/<name>/"]`` of the runs this node
        takes part in) over all others when storage or cache is over budget. The preferred set becomes
        ``config.preferred_key_prefixes`` plus ``prefixes`` (each call replaces the previous call's)."""
        chosen = (*self.config.preferred_key_prefixes, *check_prefixes("prefixes", prefixes))
        self.storage.prefer(chosen)
        self.cache.prefer(chosen)

    @classmethod
    def create(
        cls,
        config: DHTConfig,
        *,
        identity: Identity | None = None,
        transport: Transport | None = None,
        storage: RecordStorage | None = None,
    ) -> DHT:
        """A node to use as ``async with DHT.create(config) as dht``.

        ``transport=None`` makes it own a transport; ``storage=None`` keeps records in a MemoryStorage.
        """
        return cls(config, identity=identity, transport=transport, storage=storage)

    async def __aenter__(self) -> DHT:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise SwarmError("the DHT is not started; call start() or use `async with`")
        return self._transport

    @property
    def protocol(self) -> DHTProtocol:
        if self._protocol is None:
            raise SwarmError("the DHT is not started; call start() or use `async with`")
        return self._protocol

    @property
    def listen_maddrs(self) -> tuple[str, ...]:
        return self.transport.listen_maddrs

    # -- lifecycle --

    async def start(self) -> None:
        """Start the transport (if owned), serve the DHT methods, join through ``initial_peers``."""
        if self._transport is None:
            tcfg = self.config.transport
            if self.config.client_mode:
                tcfg = dataclasses.replace(tcfg, listen_maddrs=())
            self._transport = Transport(self.identity, tcfg)
            await self._transport.start()
        self._protocol = DHTProtocol(
            self.config, self._transport, self.table, self.storage, self.cache, self.checker, self._spawn
        )
        self._protocol.on_new_contact = self._on_new_contact
        self._protocol.register()
        self._protocol.running = True
        try:
            await self._bootstrap()
        except BaseException:
            await self.shutdown()
            raise
        self._spawn(self._maintenance_loop())

    async def shutdown(self) -> None:
        """Stop serving, cancel and await every background task, stop the owned transport."""
        if self._protocol is not None:
            self._protocol.running = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_transport and self._transport is not None:
            await self._transport.stop()
            self._transport = None
        elif self._protocol is not None:  # a shared transport stays up: stop serving the DHT on it
            self._protocol.unregister()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: background task failed: %r", self.peer_id.short(), task.exception())

    async def _bootstrap(self) -> None:
        peers = [m for m in self.config.initial_peers if parse_maddr(m).peer_id != self.peer_id]  # not ourselves
        if not peers:
            log.info("%s: no initial peers: starting a new swarm", self.peer_id.short())
            return
        outcomes = await asyncio.gather(*(self._ping_initial(m) for m in peers))
        errors = [o for o in outcomes if isinstance(o, str)]
        if len(errors) == len(peers):
            raise BootstrapError(
                f"none of the {len(peers)} initial peers answered ({'; '.join(errors)[:600]}); check the "
                "multiaddrs and that those nodes run, or start without initial peers to begin a new swarm"
            )
        # a wider self-lookup at join: the nodes around us learn of us and hand over the keys we now hold
        await self._lookup_nodes(self.table.local_id, width=2 * self.config.bucket_size)
        if self.config.join_refresh and len(self.table):
            nearest = self.table.nearest(self.table.local_id, 1)[0]
            farther = range(self.table.bucket_index(nearest.node_id) + 1, ID_BITS)
            await asyncio.gather(*(self._lookup_nodes(self.table.random_id_in_bucket(i, self._rng)) for i in farther))
        for i in range(ID_BITS):
            self.table.mark_refreshed(i)
        log.info("%s: joined the DHT, %d peers known", self.peer_id.short(), len(self.table))

    async def _ping_initial(self, maddr: str) -> Contact | str | None:
        try:
            return await self.protocol.call_ping(parse_maddr(maddr))
        except _FAILURES as e:
            log.warning("%s: initial peer %s did not answer: %s", self.peer_id.short(), maddr, e)
            return f"{maddr}: {e}"

    # -- lookups --

    def _params(self, value_quorum: int | None = None, width: int | None = None) -> LookupParams:
        c = self.config
        return LookupParams(
            k=width or c.bucket_size,
            alpha=c.alpha,
            call_timeout_s=c.rpc_timeout_s + 0.5,
            slow_after_s=c.slow_after_s,
            deadline_s=c.lookup_timeout_s,
            value_quorum=value_quorum,
        )

    async def _ask(self, contact: Contact, request: Callable[[], Awaitable[LookupReply]]) -> LookupReply:
        try:
            return await request()
        except _FAILURES:
            self.protocol.peer_failed(contact.peer_id)
            raise

    async def _lookup_nodes(self, target_id: int, width: int | None = None) -> LookupResult:
        async def call(contact: Contact) -> LookupReply:
            return await self._ask(contact, lambda: self._find_node(contact, target_id))

        initial = self.table.nearest(target_id, width or self.config.bucket_size)
        params = self._params(width=width)
        result = await iterative_lookup(target_id, initial, call, params, exclude=(self.peer_id,))
        self.last_lookup = result
        return result

    async def _find_node(self, contact: Contact, target_id: int) -> LookupReply:
        return LookupReply(await self.protocol.call_find_node(contact, target_id))

    async def _lookup_value(
        self, key_id: int, key: bytes, quorum: int | None, cursors: dict[PeerID, tuple[Contact, bytes]]
    ) -> LookupResult:
        async def call(contact: Contact) -> LookupReply:
            return await self._ask(contact, lambda: self._find_value(contact, key, cursors))

        initial = self.table.nearest(key_id, self.config.bucket_size)
        params = self._params(quorum or 10**9)
        result = await iterative_lookup(key_id, initial, call, params, exclude=(self.peer_id,))
        self.last_lookup = result
        return result

    async def _find_value(
        self, contact: Contact, key: bytes, cursors: dict[PeerID, tuple[Contact, bytes]]
    ) -> LookupReply:
        records, contacts, cursor = await self.protocol.call_find_value(contact, key)
        if cursor:
            cursors[contact.peer_id] = (contact, cursor)
        return LookupReply(contacts, records)

    # -- the API --

    async def store(self, key: str | bytes, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        """Store ``value`` under ``key`` (and ``subkey``) at the k closest nodes until ``expiration_time``.

        Signs automatically when the key or subkey names this node as owner. True if any node stored it.
        """
        record = make_record(key, value, expiration_time, subkey, identity=self.identity)
        self.checker.check(record)
        self._own[record.slot()] = (record, self.config.clock())
        return await self._publish(record) > 0

    async def _publish(self, record: Record) -> int:
        key_id = key_id_of_packed(record.key)
        result = await self._lookup_nodes(key_id)
        targets = result.closest[: self.config.bucket_size]
        stored = 0
        if not self.config.client_mode:
            worst = targets[-1].node_id ^ key_id if targets else 0
            if len(targets) < self.config.bucket_size or self.table.local_id ^ key_id < worst:
                stored += self.storage.put(key_id, record)
        outcomes = await asyncio.gather(*(self._store_at(c.peer_id, [record]) for c in targets))
        return stored + sum(1 for ok in outcomes if ok and ok[0])

    async def _store_at(self, peer_id: PeerID, records: Sequence[Record]) -> list[bool]:
        try:
            return await self.protocol.call_store(peer_id, records)
        except _FAILURES as e:
            log.debug("%s: STORE at %s failed: %s", self.peer_id.short(), peer_id.short(), e)
            return []

    async def get(
        self, key: str | bytes, latest: bool = False
    ) -> ValueWithExpiration | dict[Any, ValueWithExpiration] | None:
        """The value of ``key``: a ValueWithExpiration, a {subkey: ValueWithExpiration} dict, or None.

        ``latest=False`` returns as soon as ``get_quorum`` peers (or this node) answered with the key;
        ``latest=True`` asks until the k closest peers answered and keeps the newest version of each subkey.
        Paged replies (a dictionary larger than ``max_reply_bytes``) are followed: see :func:`follow_pages`.
        """
        key_bytes = packb(key)
        key_id = key_id_of_packed(key_bytes)
        self.last_lookup = None
        local = self.protocol.local_records(key_id)
        found = list(local)
        if not found or latest:
            cursors: dict[PeerID, tuple[Contact, bytes]] = {}
            result = await self._lookup_value(key_id, key_bytes, None if latest else self.config.get_quorum, cursors)
            fetched = list(result.found)
            if cursors:  # the rest of paged replies: from the alpha closest peers that paged
                starts = sorted(cursors.values(), key=lambda pair: pair[0].node_id ^ key_id)[: self.config.alpha]
                fetched.extend(await self._follow_pages(key_bytes, starts))
            for _, records in fetched:
                found.extend(records)
            if self.config.cache_on_path:
                self._cache_fetched(key_id, fetched, local)
        return self._merge(self._winners(found))

    async def _follow_pages(
        self, key: bytes, starts: Sequence[tuple[Contact, bytes]]
    ) -> list[tuple[Contact, list[Record]]]:
        async def fetch(contact: Contact, cursor: bytes) -> tuple[list[Record], bytes]:
            records, _, next_cursor = await self.protocol.call_find_value(contact, key, cursor)
            return records, next_cursor

        limit = self.config.max_subkeys_per_key + 1  # an honest holder has no more records for one key
        return await follow_pages(fetch, starts, deadline_s=self.config.lookup_timeout_s, max_records=limit)

    def _cache_fetched(
        self, key_id: int, fetched: Sequence[tuple[Contact, Sequence[Record]]], local: Sequence[Record]
    ) -> None:
        """Keep what this node fetched (the winning versions it does not hold already) in its cache."""
        source = {id(r): contact.peer_id for contact, records in fetched for r in records}
        held = {r.slot(): r for r in local}
        keep_until = self.config.clock() + self.config.cache_ttl_s
        for record in self._winners([r for _, records in fetched for r in records]):
            if held.get(record.slot()) != record:
                self.cache.put(key_id, record, source=source[id(record)], keep_until=keep_until)

    def _winners(self, records: Sequence[Record]) -> list[Record]:
        now = self.config.clock()
        best: dict[tuple[bytes, bytes | None], Record] = {}
        for record in records:
            if record.expiration_time <= now:
                continue
            current = best.get(record.slot())
            best[record.slot()] = record if current is None else self.checker.select(current, record)
        return list(best.values())

    @staticmethod
    def _merge(records: Sequence[Record]) -> ValueWithExpiration | dict[Any, ValueWithExpiration] | None:
        plain = next((r for r in records if r.subkey is None), None)
        subs = [r for r in records if r.subkey is not None]
        if plain is not None and (
            not subs or (plain.expiration_time > max(r.expiration_time for r in subs) and not any(map(is_owned, subs)))
        ):  # a plain value never hides owner-signed subkeys, as in storage
            return plain.with_value()
        if subs:
            return {r.unpacked_subkey(): r.with_value() for r in subs}
        return None

    async def find_peers(self, key: str | bytes, k: int | None = None) -> list[Contact]:
        """The ``k`` (default bucket_size) other peers closest to ``key`` that answered, closest first."""
        result = await self._lookup_nodes(key_id_of_packed(packb(key)))
        return result.closest[: k or self.config.bucket_size]

    async def crawl(self, max_peers: int | None = None) -> list[RoutingTableReply]:
        """Every reachable server peer, found by asking each known peer for its routing table (bounded)."""
        limit = max_peers or self.config.max_crawl_peers
        seen: set[PeerID] = {self.peer_id}
        queue: list[PeerID] = []
        for contact in self.table.contacts():
            seen.add(contact.peer_id)
            queue.append(contact.peer_id)
        answers: list[RoutingTableReply] = []
        while queue and len(answers) < limit:
            batch, queue = queue[:16], queue[16:]
            replies = await asyncio.gather(*(self._routing_table_of(p) for p in batch))
            for reply in replies:
                if reply is None:
                    continue
                answers.append(reply)
                for info in reply.peers:
                    found = self.protocol.contact_from(info)
                    if found is not None and found.peer_id not in seen:
                        seen.add(found.peer_id)
                        queue.append(found.peer_id)
        return answers[:limit]

    async def _routing_table_of(self, peer_id: PeerID) -> RoutingTableReply | None:
        try:
            return await self.protocol.call_routing_table(peer_id)
        except _FAILURES as e:
            log.debug("%s: crawl: %s did not answer: %s", self.peer_id.short(), peer_id.short(), e)
            return None

    # -- maintenance --

    def _on_new_contact(self, contact: Contact) -> None:
        records = self._records_for(contact)
        if records:
            self._spawn(self._store_at(contact.peer_id, records))

    def _records_for(self, contact: Contact) -> list[Record]:
        """Stored records whose k closest now include ``contact`` (a holder pushed out by it hands over too)."""
        ids = [c.node_id for c in self.table.contacts() if c.peer_id != contact.peer_id]
        ids.append(self.table.local_id)
        records = []
        for key_id in self.storage.key_ids():
            if _among_closest(contact.node_id, key_id, ids, self.config.bucket_size):
                records.extend(self.storage.get(key_id))
        return records

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.maintenance_interval_s)
            try:
                await self.maintain()
            except SwarmError as e:
                log.warning("%s: maintenance failed: %s", self.peer_id.short(), e)

    async def maintain(self) -> None:
        """One maintenance pass: expire records, refresh stale buckets, republish own records that are due."""
        self.storage.remove_expired()
        self.cache.remove_expired()
        now = self.config.clock()
        for i in self.table.stale_buckets(now, self.config.refresh_interval_s):
            self.table.mark_refreshed(i)
            await self._lookup_nodes(self.table.random_id_in_bucket(i, self._rng))
        for slot, (record, published_s) in list(self._own.items()):
            if record.expiration_time <= now:
                del self._own[slot]
            elif now - published_s >= self.config.republish_interval_s:
                self._own[slot] = (record, now)
                await self._publish(record)


def _among_closest(node_id: int, target_id: int, others: Sequence[int], k: int) -> bool:
    """True if fewer than ``k`` of ``others`` are closer to ``target_id`` than ``node_id`` (early exit)."""
    d = node_id ^ target_id
    closer = 0
    for other in others:
        if other ^ target_id < d:
            closer += 1
            if closer >= k:
                return False
    return True
