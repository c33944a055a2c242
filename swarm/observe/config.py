"""`HttpConfig`: where ``swarm-node start --http HOST:PORT`` serves, and how its endpoints judge the node.

`parse_http_address` reads the option: ``HOST:PORT``, ``[IPv6]:PORT``, or a bare ``PORT`` (loopback). Port 0 picks a
free port (the node reports the one it got).
"""

from __future__ import annotations

import ipaddress

from swarm.configs import Config, setting
from swarm.errors import ConfigError, SwarmError

LOOPBACK_HOST = "127.0.0.1"


class HttpServeError(SwarmError):
    """The HTTP endpoints could not start (most often: the port is in use)."""

    code = "http_serve"


class HttpConfig(Config, section="http"):
    """The node's HTTP endpoints (/metrics, /health, /, /api/status) and their judgement of the node."""

    host: str = setting(default=LOOPBACK_HOST, doc="Address to bind; loopback unless told otherwise.")
    port: int = setting(default=0, ge=0, le=65535, doc="TCP port (0: any free port, reported when listening).")
    refresh_s: float = setting(default=2.0, gt=0, le=3600, doc="Seconds between reads of the swarm's DHT records.")
    dht_timeout_s: float = setting(default=5.0, gt=0, le=3600, doc="Deadline of one DHT read.")
    ping_timeout_s: float = setting(default=2.0, gt=0, le=3600, doc="Deadline of one reachability ping.")
    reach_interval_s: float = setting(default=10.0, gt=0, le=86400, doc="Seconds between reachability pings.")
    max_pinged_peers: int = setting(default=64, ge=0, le=4096, doc="At most this many peers pinged per round.")
    stall_s: float = setting(default=120.0, gt=0, le=86400, doc="/health: a step older than this means stuck.")
    min_stage_peers: int = setting(
        default=2, ge=1, le=1024, doc="/health: fewer peers than this in the node's stage (itself included): alone."
    )
    attestation_windows: int = setting(default=4, ge=1, le=64, doc="Recent reward windows read for attestations.")
    max_curve_points: int = setting(default=400, ge=10, le=100_000, doc="Points per loss curve in /api/status.")

    def validate(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise self.invalid("host", f"must be an IP address, got {self.host!r}") from None

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6, or a bare ``PORT`` for loopback) -> (host, port); ConfigError else."""
    spec = text.strip()
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        host, port_text = LOOPBACK_HOST, spec
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif not host:
        host = LOOPBACK_HOST
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--http: expected HOST:PORT with a port in 0..65535, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--http: the host must be an IP address (e.g. 127.0.0.1 or 0.0.0.0), got {host!r}") from None
    return host, int(port_text)
