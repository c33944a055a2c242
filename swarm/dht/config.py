"""DHTConfig: every knob of one DHT node, validated up front (a ConfigError names the field)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from swarm.p2p.maddr import parse_maddr
from swarm.dht.records import RecordValidator
from swarm.dht.storage import check_prefixes
from swarm.p2p import TransportConfig
from swarm.errors import AddressError, ConfigError


def _default_transport() -> TransportConfig:
    return TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), idle_timeout_s=60.0)


@dataclass(frozen=True, kw_only=True)
class DHTConfig:
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

    initial_peers: tuple[str, ...] = ()
    client_mode: bool = False
    transport: TransportConfig = field(default_factory=_default_transport)
    bucket_size: int = 20
    alpha: int = 3
    rpc_timeout_s: float = 3.0
    slow_after_s: float = 0.75
    lookup_timeout_s: float = 8.0
    get_quorum: int = 1
    refresh_interval_s: float = 600.0
    republish_interval_s: float = 600.0
    maintenance_interval_s: float = 5.0
    join_refresh: bool = True
    cache_on_path: bool = True
    max_key_size_bytes: int = 1024
    max_value_size_bytes: int = 64 * 1024
    max_ttl_s: float = 7 * 86400.0
    clock_skew_s: float = 30.0
    max_records: int = 100_000
    max_records_per_peer: int = 10_000
    max_cached_records: int = 10_000
    max_records_per_store: int = 64
    storage_budget_bytes: int = 64 * 1024 * 1024
    cache_budget_bytes: int = 16 * 1024 * 1024
    max_share_per_peer: float = 0.125
    max_share_per_ip: float = 0.25
    max_subkeys_per_key: int = 1024
    preferred_key_prefixes: tuple[str, ...] = ()
    max_reply_bytes: int = 4 * 1024 * 1024
    cache_ttl_s: float = 60.0
    max_crawl_peers: int = 10_000
    validators: tuple[RecordValidator, ...] = ()
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if not isinstance(self.initial_peers, tuple):
            raise ConfigError(
                f"initial_peers must be a tuple of multiaddr strings, got {type(self.initial_peers).__name__}"
            )
        for maddr in self.initial_peers:
            try:
                parse_maddr(maddr)
            except AddressError as e:
                raise ConfigError(f"initial_peers: {e}") from None
        if not isinstance(self.transport, TransportConfig):
            raise ConfigError(f"transport must be a TransportConfig, got {type(self.transport).__name__}")
        for name in ("client_mode", "join_refresh", "cache_on_path"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name, low, high in (
            ("bucket_size", 1, 1000),
            ("alpha", 1, 100),
            ("get_quorum", 1, 1000),
            ("max_key_size_bytes", 16, 1 << 20),
            ("max_value_size_bytes", 16, 1 << 26),
            ("max_records", 1, 1 << 30),
            ("max_records_per_peer", 1, 1 << 30),
            ("max_cached_records", 1, 1 << 30),
            ("max_records_per_store", 1, 10_000),
            ("max_crawl_peers", 1, 1 << 20),
            ("storage_budget_bytes", 1 << 16, 1 << 40),
            ("cache_budget_bytes", 1 << 16, 1 << 40),
            ("max_subkeys_per_key", 1, 1 << 20),
            ("max_reply_bytes", 1 << 16, 1 << 30),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{name} must be an int in [{low}, {high}], got {value!r}")
        for name in (
            "rpc_timeout_s",
            "slow_after_s",
            "lookup_timeout_s",
            "refresh_interval_s",
            "republish_interval_s",
            "maintenance_interval_s",
            "max_ttl_s",
            "cache_ttl_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.clock_skew_s, (int, float)) or not 0 <= self.clock_skew_s <= 3600:
            raise ConfigError(f"clock_skew_s must be in [0, 3600] seconds, got {self.clock_skew_s!r}")
        if self.lookup_timeout_s < self.rpc_timeout_s:
            raise ConfigError(
                f"lookup_timeout_s ({self.lookup_timeout_s}) must be >= rpc_timeout_s ({self.rpc_timeout_s})"
            )
        for name in ("max_share_per_peer", "max_share_per_ip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
                raise ConfigError(f"{name} must be a fraction of the budget in (0, 1], got {value!r}")
        check_prefixes("preferred_key_prefixes", self.preferred_key_prefixes)
        if not isinstance(self.preferred_key_prefixes, tuple):
            raise ConfigError("preferred_key_prefixes must be a tuple of strings")
        largest_record = self.max_value_size_bytes + 2 * self.max_key_size_bytes + 1024
        if self.max_reply_bytes < largest_record:
            raise ConfigError(
                f"max_reply_bytes ({self.max_reply_bytes}) must hold the largest record ({largest_record} bytes: "
                "max_value_size_bytes + 2 x max_key_size_bytes + 1024)"
            )
        if not callable(self.clock):
            raise ConfigError("clock must be a callable returning seconds since the epoch")
        for validator in self.validators:
            if not (hasattr(validator, "validate") and hasattr(validator, "select")):
                raise ConfigError(f"validators: {validator!r} lacks validate() and select()")
