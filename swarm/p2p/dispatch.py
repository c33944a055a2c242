"""Request dispatch: a REQUEST frame becomes a handler task on its connection, or an error answer.

A request is checked at the edge: a malformed head or chunks sent to a unary method get ``bad_request``, a
method nobody registered gets ``unknown_method``, and a peer with ``max_inflight_requests_per_peer`` requests
in flight (over all its connections) gets ``overloaded``. Each refusal is logged as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from swarm.p2p import rpc
from swarm.p2p.config import TransportConfig
from swarm.p2p.connection import Connection
from swarm.p2p.framing import FLAG_CHUNKS, ErrorCode, Frame, decode_request
from swarm.p2p.rpc import HandlerEntry
from swarm.p2p.streams import Stream
from swarm.errors import ProtocolError

log = logging.getLogger(__name__)


def dispatch_request(
    conn: Connection,
    stream: Stream,
    frame: Frame,
    *,
    handlers: Mapping[str, HandlerEntry],
    config: TransportConfig,
    inflight: Callable[[Connection], int],
) -> None:
    """Check a REQUEST frame and start its handler on ``conn``, or answer with an error.

    ``inflight(conn)``: the requests being served for ``conn``'s peer, over all its connections.
    """
    local = conn.local_short
    try:
        head = decode_request(frame.payload, max_size_bytes=config.max_message_size_bytes)
    except ProtocolError as e:
        log.warning("%s: malformed request from %s: %s", local, conn.peer_short, e)
        rpc.reject(conn, stream, ErrorCode.BAD_REQUEST, str(e))
        return
    stream.method = head.method
    entry = handlers.get(head.method)
    with_chunks = bool(frame.flags & FLAG_CHUNKS)
    if entry is None:
        log.warning("%s: request for unknown method %r from %s", local, head.method[:100], conn.peer_short)
        rpc.reject(conn, stream, ErrorCode.UNKNOWN_METHOD, f"this peer serves no method {head.method[:100]!r}")
    elif with_chunks and not entry.streaming:
        log.warning("%s: chunks sent to unary method %s by %s", local, head.method, conn.peer_short)
        rpc.reject(conn, stream, ErrorCode.BAD_REQUEST, f"{head.method} is unary; call it without chunks")
    elif (count := inflight(conn)) >= config.max_inflight_requests_per_peer:
        log.warning("%s: overloaded: %s has %d requests in flight", local, conn.peer_short, count)
        rpc.reject(
            conn,
            stream,
            ErrorCode.OVERLOADED,
            f"{count} requests in flight from you (max_inflight_requests_per_peer)",
        )
    else:
        stream.expects_chunks = with_chunks
        if with_chunks:
            stream.announce_window()
        stream.handler_task = conn.spawn(rpc.serve_request(conn, stream, entry, head))
