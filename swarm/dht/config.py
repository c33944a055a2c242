"""DHTConfig: every knob of one DHT node, validated up front (a ConfigError names the field)."""

from __future__ import annotations

import time
from collections.abc import Callable

from swarm.p2p.maddr import parse_maddr
from swarm.dht.records import RecordValidator
from swarm.dht.storage import check_prefixes
from swarm.p2p import TransportConfig
from swarm.configs import Config, setting
from swarm.errors import AddressError, ConfigError


def _default_transport() -> TransportConfig:
    return TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), idle_timeout_s=60.0)


class DHTConfig(Config, section="dht"):
    """Configuration of one :class:`~swarm.dht.node.DHT` node. Durations in seconds, sizes in bytes.

    ``initial_peers`` are multiaddrs of running nodes (the first node of a swarm has none).
    ``client_mode`` nodes get and store but never enter other nodes' routing tables (and do not listen).
    ``transport`` configures the transport the DHT creates when it is not given one.

    Storage limits (docs/dht.md, "Storage budgets"): ``storage_budget_bytes`` and ``cache_budget_bytes`` bound
    what the node holds; one sending PeerID may hold ``max_share_per_peer`` and one source IP
    ``max_share_per_ip`` of each; keys starting with ``preferred_key_prefixes`` are evicted last;
    a key holds at most ``max_subkeys_per_key`` subkeys; one FIND_VALUE reply carries at most ``max_reply_bytes``
    of records (and at most half the transport's ``max_message_size_bytes``; the rest is paged); a copy cached
    by ``get`` is kept at most ``cache_ttl_s``.
    """

    initial_peers: tuple[str, ...] = setting(default=(), doc="Multiaddrs of running nodes to join through.")
    client_mode: bool = setting(default=False, doc="Get and store, but never enter others' routing tables.")
    transport: TransportConfig = setting(
        default_factory=_default_transport, doc="The transport created when the DHT is given none."
    )
    bucket_size: int = setting(default=20, ge=1, le=1000, doc="k: contacts per routing-table bucket and replicas.")
    alpha: int = setting(default=3, ge=1, le=100, doc="Parallel requests of one lookup.")
    rpc_timeout_s: float = setting(default=3.0, gt=0, doc="Deadline of one DHT request.")
    slow_after_s: float = setting(default=0.75, gt=0, doc="A lookup asks one more peer after waiting this long.")
    lookup_timeout_s: float = setting(default=8.0, gt=0, doc="Deadline of one lookup (>= rpc_timeout_s).")
    get_quorum: int = setting(default=1, ge=1, le=1000, doc="Answers with a value before a get stops.")
    refresh_interval_s: float = setting(default=600.0, gt=0, doc="A bucket unused this long is refreshed.")
    republish_interval_s: float = setting(default=600.0, gt=0, doc="Seconds between republishes of own records.")
    maintenance_interval_s: float = setting(default=5.0, gt=0, doc="Seconds between maintenance rounds.")
    join_refresh: bool = setting(default=True, doc="Refresh every bucket after joining.")
    cache_on_path: bool = setting(
        default=True, doc="Keep what get fetched from peers in this node's cache (for cache_ttl_s)."
    )
    max_key_size_bytes: int = setting(default=1024, ge=16, le=1 << 20, doc="Largest key accepted.")
    max_value_size_bytes: int = setting(default=64 * 1024, ge=16, le=1 << 26, doc="Largest value accepted.")
    max_ttl_s: float = setting(default=7 * 86400.0, gt=0, doc="Longest lifetime a stored record may ask for.")
    clock_skew_s: float = setting(default=30.0, ge=0, le=3600, doc="Tolerated clock difference between peers.")
    max_records: int = setting(default=100_000, ge=1, le=1 << 30, doc="Most records stored.")
    max_records_per_peer: int = setting(default=10_000, ge=1, le=1 << 30, doc="Most records stored for one peer.")
    max_cached_records: int = setting(
        default=10_000, ge=1, le=1 << 30, doc="Most records in the cache of fetched records."
    )
    max_records_per_store: int = setting(default=64, ge=1, le=10_000, doc="Most records in one store request.")
    storage_budget_bytes: int = setting(
        default=64 * 1024 * 1024, ge=1 << 16, le=1 << 40, doc="Bytes the stored records may take together."
    )
    cache_budget_bytes: int = setting(
        default=16 * 1024 * 1024, ge=1 << 16, le=1 << 40, doc="Bytes the cached records may take together."
    )
    max_share_per_peer: float = setting(
        default=0.125, gt=0, le=1, doc="Share of each budget one sending PeerID may hold."
    )
    max_share_per_ip: float = setting(
        default=0.25, gt=0, le=1, doc="Share of each budget one source IP (IPv6: one /64) may hold."
    )
    max_subkeys_per_key: int = setting(default=1024, ge=1, le=1 << 20, doc="Most subkeys one key holds.")
    preferred_key_prefixes: tuple[str, ...] = setting(
        default=(), doc="Keys starting with one of these are evicted last."
    )
    max_reply_bytes: int = setting(
        default=4 * 1024 * 1024, ge=1 << 16, le=1 << 30, doc="Most record bytes in one FIND_VALUE reply (rest paged)."
    )
    cache_ttl_s: float = setting(default=60.0, gt=0, doc="Longest a copy cached by get is kept.")
    max_crawl_peers: int = setting(default=10_000, ge=1, le=1 << 20, doc="Most peers one crawl visits.")
    validators: tuple[RecordValidator, ...] = setting(default=(), doc="Schema hooks every stored record must pass.")
    clock: Callable[[], float] = setting(default=time.time, doc="Seconds since the epoch (injected in tests).")

    def validate(self) -> None:
        for maddr in self.initial_peers:
            try:
                parse_maddr(maddr)
            except AddressError as e:
                raise ConfigError(f"dht.initial_peers: {e}") from None
        if self.lookup_timeout_s < self.rpc_timeout_s:
            raise self.invalid(
                "lookup_timeout_s", f"({self.lookup_timeout_s}) must be >= rpc_timeout_s ({self.rpc_timeout_s})"
            )
        check_prefixes(f"{self.section}.preferred_key_prefixes", self.preferred_key_prefixes)
        largest_record = self.max_value_size_bytes + 2 * self.max_key_size_bytes + 1024
        if self.max_reply_bytes < largest_record:
            raise self.invalid(
                "max_reply_bytes",
                f"({self.max_reply_bytes}) must hold the largest record ({largest_record} bytes: "
                "max_value_size_bytes + 2 x max_key_size_bytes + 1024)",
            )
        for validator in self.validators:
            if not (hasattr(validator, "validate") and hasattr(validator, "select")):
                raise ConfigError(f"dht.validators: {validator!r} lacks validate() and select()")
