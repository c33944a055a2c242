"""TransportConfig: every limit and deadline of the transport, validated up front."""

from __future__ import annotations


from swarm.p2p.maddr import parse_maddr
from swarm.configs import Config, setting
from swarm.errors import AddressError, ConfigError

# A Noise transport message is at most 65535 bytes including its 16-byte tag (Noise spec, section 3).
MAX_NOISE_MESSAGE_BYTES = 65535
# The window every stream starts with, in each direction, before the receiver announces its own.
INITIAL_STREAM_WINDOW_BYTES = 256 * 1024


class TransportConfig(Config, section="transport"):
    """Limits and deadlines of one :class:`~swarm.p2p.Transport`.

    ``listen_maddrs`` are ``/ip4|ip6|dns4|dns6/<host>/tcp/<port>`` (port 0 picks a free port); ``()`` makes a
    dial-only transport. Every timeout is in seconds; every size in bytes.

    Connection budgets (docs/transport.md, "Connection budgets"): ``max_connections`` established connections
    (both directions), of which ``max_connections_per_ip`` inbound ones from one source address (an IPv6 /64);
    ``max_pending_connections`` inbound connections still in the handshake, ``max_pending_per_ip`` from one
    address; ``protected_reserve_fraction`` of ``max_connections`` is kept for protected peers
    (``Transport.protect``). Refusals and evictions are summarized once per ``connection_log_interval_s``.
    """

    listen_maddrs: tuple[str, ...] = setting(default=(), doc="Multiaddrs to listen on (port 0: any free port).")
    rpc_timeout_s: float = setting(default=10.0, gt=0, le=86400, doc="Deadline of one request's answer.")
    connect_timeout_s: float = setting(default=5.0, gt=0, le=86400, doc="Deadline of opening a TCP connection.")
    handshake_timeout_s: float = setting(default=5.0, gt=0, le=86400, doc="Deadline of the Noise handshake.")
    write_timeout_s: float = setting(default=10.0, gt=0, le=86400, doc="Deadline of draining one write.")
    idle_timeout_s: float = setting(default=120.0, gt=0, le=86400, doc="A connection idle this long is closed.")
    close_linger_s: float = setting(
        default=2.0,
        ge=0,
        le=600,
        doc="On stop or disconnect, how long a connection may wait for its peer to read what we wrote (0: abort).",
    )
    max_connections: int = setting(
        default=512, ge=1, le=1_000_000, doc="Most established connections, both directions together."
    )
    max_connections_per_ip: int = setting(
        default=128, ge=1, le=1_000_000, doc="Most inbound established connections from one address (IPv6: /64)."
    )
    max_pending_connections: int = setting(
        default=64, ge=1, le=1_000_000, doc="Most inbound connections still in the handshake."
    )
    max_pending_per_ip: int = setting(
        default=16, ge=1, le=1_000_000, doc="Most inbound connections in the handshake from one address."
    )
    protected_reserve_fraction: float = setting(
        default=0.125, ge=0, le=0.5, doc="Share of max_connections kept for protected peers."
    )
    connection_log_interval_s: float = setting(
        default=10.0, gt=0, le=86400, doc="Refusals and evictions are summarized once per this many seconds."
    )
    max_inflight_requests_per_peer: int = setting(
        default=128, ge=1, le=1_000_000, doc="Most requests one peer may have in flight here."
    )
    max_frame_size_bytes: int = setting(
        default=16 * 1024 * 1024, ge=1024, le=1 << 31, doc="Largest frame accepted from a peer."
    )
    max_message_size_bytes: int = setting(
        default=8 * 1024 * 1024, ge=64, doc="Largest message (at most max_frame_size_bytes - 64)."
    )
    stream_window_bytes: int = setting(
        default=8 * 1024 * 1024, ge=INITIAL_STREAM_WINDOW_BYTES, le=1 << 31, doc="Flow-control window of a stream."
    )
    write_buffer_high_bytes: int = setting(
        default=4 * 1024 * 1024, ge=MAX_NOISE_MESSAGE_BYTES, le=1 << 31, doc="Buffered bytes at which writers wait."
    )
    emulated_delay_s: float = setting(
        default=0.0,
        ge=0,
        le=10,
        doc="For tests and benchmarks of latency hiding: delay every write by this long (0: off; see p2p/delay.py).",
    )

    def validate(self) -> None:
        for maddr in self.listen_maddrs:
            try:
                parse_maddr(maddr)
            except AddressError as e:
                raise ConfigError(f"transport.listen_maddrs: {e}") from None
        if self.max_message_size_bytes > self.max_frame_size_bytes - 64:
            raise self.invalid(
                "max_message_size_bytes",
                f"must be at most max_frame_size_bytes - 64 ({self.max_frame_size_bytes - 64}), "
                f"got {self.max_message_size_bytes!r}",
            )

    @property
    def reserved_connections(self) -> int:
        """Established slots only protected peers may take: ``protected_reserve_fraction`` of ``max_connections``."""
        return int(self.max_connections * self.protected_reserve_fraction)
