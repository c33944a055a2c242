"""The DHT node: its parts wired together, its lifecycle, and the API (store, get, find_peers, crawl).

The work is done by its parts: :mod:`~swarm.dht.protocol` (clients, peers seen) with :mod:`~swarm.dht.handlers`,
:mod:`~swarm.dht.bootstrap` (joining), :mod:`~swarm.dht.finder` (lookups), :mod:`~swarm.dht.publish` (store,
republish, hand-over), :mod:`~swarm.dht.fetch` (get, paging, path caching), :mod:`~swarm.dht.crawl`.
Maintenance (one owned task): drop expired records, refresh buckets not touched for ``refresh_interval_s``
(a lookup of a random ID in their range), republish this node's own records every ``republish_interval_s``
until they expire. When a new peer enters the routing table, the records it is now among the ``k`` closest
to are handed over to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

from swarm.dht.bootstrap import bootstrap
from swarm.dht.config import DHTConfig
from swarm.dht.crawl import crawl
from swarm.dht.fetch import Fetcher
from swarm.dht.finder import Finder
from swarm.dht.lookup import LookupResult
from swarm.dht.messages import RoutingTableReply
from swarm.dht.protocol import DHTProtocol
from swarm.dht.publish import Publisher
from swarm.dht.records import RecordChecker, ValueWithExpiration, make_record
from swarm.dht.routing import Contact, RoutingTable, key_id_of_packed, node_id_of
from swarm.dht.storage import MemoryStorage, RecordStorage, StorageConfig, check_prefixes
from swarm.p2p import Transport
from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.messages import packb
from swarm.errors import ConfigError, SwarmError

log = logging.getLogger(__name__)


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
        self._protocol: DHTProtocol | None = None
        self._finder = Finder(self)
        self._publisher = Publisher(self, self._finder)
        self._fetcher = Fetcher(self, self._finder)

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
    def last_lookup(self) -> LookupResult | None:
        """The most recent network lookup's result (None if the last ``get`` was served locally)."""
        return self._finder.last

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
            await bootstrap(self, self._finder)
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

    # -- the API --

    async def store(self, key: str | bytes, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        """Store ``value`` under ``key`` (and ``subkey``) at the k closest nodes until ``expiration_time``.

        Signs automatically when the key or subkey names this node as owner. True if any node stored it.
        """
        record = make_record(key, value, expiration_time, subkey, identity=self.identity)
        self.checker.check(record)
        return await self._publisher.store(record)

    async def get(
        self, key: str | bytes, latest: bool = False
    ) -> ValueWithExpiration | dict[Any, ValueWithExpiration] | None:
        """The value of ``key``: a ValueWithExpiration, a {subkey: ValueWithExpiration} dict, or None.

        ``latest=False`` returns as soon as ``get_quorum`` peers (or this node) answered with the key;
        ``latest=True`` asks until the k closest peers answered and keeps the newest version of each subkey.
        Paged replies (a dictionary larger than ``max_reply_bytes``) are followed: see :func:`follow_pages`.
        """
        return await self._fetcher.get(key, latest)

    async def find_peers(self, key: str | bytes, k: int | None = None) -> list[Contact]:
        """The ``k`` (default bucket_size) other peers closest to ``key`` that answered, closest first."""
        result = await self._finder.nodes(key_id_of_packed(packb(key)))
        return result.closest[: k or self.config.bucket_size]

    async def crawl(self, max_peers: int | None = None) -> list[RoutingTableReply]:
        """Every reachable server peer, found by asking each known peer for its routing table (bounded)."""
        return await crawl(self, max_peers or self.config.max_crawl_peers)

    # -- maintenance --

    def _on_new_contact(self, contact: Contact) -> None:
        records = self._publisher.records_for(contact)
        if records:
            self._spawn(self._publisher.store_at(contact.peer_id, records))

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
            await self._finder.nodes(self._finder.random_id_in_bucket(i))
        await self._publisher.republish_due(now)
