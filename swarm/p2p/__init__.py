"""The encrypted, multiplexed transport: Noise XX over TCP, typed msgpack RPC, chunked streams.

See docs/transport.md for the wire format and docs/architecture.md ("Transport and RPC") for the API.
"""

from swarm.p2p.config import TransportConfig
from swarm.p2p.rpc import RpcContext, StreamReply
from swarm.p2p.transport import Transport

__all__ = ["RpcContext", "StreamReply", "Transport", "TransportConfig"]
