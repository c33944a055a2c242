"""The encrypted, multiplexed transport: Noise XX over TCP, typed msgpack RPC, chunked streams.

See docs/transport.md for the wire format and docs/architecture.md ("Transport and RPC") for the API.
"""

from dht.transport.config import TransportConfig
from dht.transport.rpc import RpcContext, StreamReply
from dht.transport.transport import Transport

__all__ = ["Transport", "TransportConfig", "RpcContext", "StreamReply"]
