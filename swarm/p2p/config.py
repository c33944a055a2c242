"""TransportConfig: every limit and deadline of the transport, validated up front."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.p2p.maddr import parse_maddr
from swarm.errors import AddressError, ConfigError

# A Noise transport message is at most 65535 bytes including its 16-byte tag (Noise spec, section 3).
MAX_NOISE_MESSAGE_BYTES = 65535
# The window every stream starts with, in each direction, before the receiver announces its own.
INITIAL_STREAM_WINDOW_BYTES = 256 * 1024


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """Limits and deadlines of one :class:`~swarm.p2p.Transport`.

    ``listen_maddrs`` are ``/ip4|ip6|dns4|dns6/<host>/tcp/<port>`` (port 0 picks a free port); ``()`` makes a
    dial-only transport. Every timeout is in seconds; every size in bytes.

    Connection budgets (docs/transport.md, "Connection budgets"): ``max_connections`` established connections
    (both directions), of which ``max_connections_per_ip`` inbound ones from one source address (an IPv6 /64);
    ``max_pending_connections`` inbound connections still in the handshake, ``max_pending_per_ip`` from one
    address; ``protected_reserve_fraction`` of ``max_connections`` is kept for protected peers
    (``Transport.protect``). Refusals and evictions are summarized once per ``connection_log_interval_s``.
    """

    listen_maddrs: tuple[str, ...] = ()
    rpc_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 5.0
    write_timeout_s: float = 10.0
    idle_timeout_s: float = 120.0
    max_connections: int = 512
    max_connections_per_ip: int = 128
    max_pending_connections: int = 64
    max_pending_per_ip: int = 16
    protected_reserve_fraction: float = 0.125
    connection_log_interval_s: float = 10.0
    max_inflight_requests_per_peer: int = 128
    max_frame_size_bytes: int = 16 * 1024 * 1024
    max_message_size_bytes: int = 8 * 1024 * 1024
    stream_window_bytes: int = 8 * 1024 * 1024
    write_buffer_high_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not isinstance(self.listen_maddrs, tuple):
            kind = type(self.listen_maddrs).__name__
            raise ConfigError(f"listen_maddrs must be a tuple of multiaddr strings, got {kind}")
        for maddr in self.listen_maddrs:
            try:
                parse_maddr(maddr)
            except AddressError as e:
                raise ConfigError(f"listen_maddrs: {e}") from None
        for name in (
            "rpc_timeout_s",
            "connect_timeout_s",
            "handshake_timeout_s",
            "write_timeout_s",
            "idle_timeout_s",
            "connection_log_interval_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86400:
                raise ConfigError(f"{name} must be a number of seconds in (0, 86400], got {value!r}")
        for name in (
            "max_connections",
            "max_connections_per_ip",
            "max_pending_connections",
            "max_pending_per_ip",
            "max_inflight_requests_per_peer",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
                raise ConfigError(f"{name} must be an int in [1, 1000000], got {value!r}")
        fraction = self.protected_reserve_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 0.5:
            raise ConfigError(f"protected_reserve_fraction must be a number in [0, 0.5], got {fraction!r}")
        self._check_size("max_frame_size_bytes", 1024, 1 << 31)
        self._check_size("max_message_size_bytes", 64, self.max_frame_size_bytes - 64)
        self._check_size("stream_window_bytes", INITIAL_STREAM_WINDOW_BYTES, 1 << 31)
        self._check_size("write_buffer_high_bytes", MAX_NOISE_MESSAGE_BYTES, 1 << 31)

    @property
    def reserved_connections(self) -> int:
        """Established slots only protected peers may take: ``protected_reserve_fraction`` of ``max_connections``."""
        return int(self.max_connections * self.protected_reserve_fraction)

    def _check_size(self, name: str, low: int, high: int) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{name} must be an int number of bytes in [{low}, {high}], got {value!r}")
