"""The node's HTTP endpoints (``swarm-node start --http HOST:PORT``): Prometheus metrics, a health check and a
status page of the swarm. `Observer` serves them on the node's event loop; see docs/observe.md."""

from swarm.observe.config import HttpConfig, HttpServeError, parse_http_address
from swarm.observe.http import Observer
from swarm.observe.source import NodeSource

__all__ = ["HttpConfig", "HttpServeError", "NodeSource", "Observer", "parse_http_address"]
