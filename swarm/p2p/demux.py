"""Inbound frames to their streams: a REQUEST opens a stream, every other frame goes to the stream it names.

Stream ids tell the sides apart (the dialler's are odd, the listener's even, 0 is the connection's own: PING,
PONG and the closing ERROR, which the connection handles itself). A frame for a stream that is finished or
cancelled here is late and harmless; a second answer to one call, or a REQUEST reusing an id, is a protocol error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarm.p2p.framing import Frame, FrameType
from swarm.p2p.streams import Stream
from swarm.errors import ProtocolError, TransportError

if TYPE_CHECKING:
    from swarm.p2p.connection import Connection


def deliver(conn: Connection, frame: Frame) -> None:
    """Route one frame of a stream (not a control frame of stream 0) on ``conn``."""
    ftype = frame.type
    stream = conn.streams.get(frame.stream_id)
    if ftype is FrameType.REQUEST:
        ours = 1 if conn.initiator else 0  # the parity of the stream ids this side opens
        if stream is not None or frame.stream_id % 2 == ours or frame.stream_id == 0:
            raise ProtocolError(f"REQUEST with a bad or reused stream id {frame.stream_id}")
        stream = Stream(conn, frame.stream_id, "?", window_bytes=conn.config.stream_window_bytes)
        conn.streams[frame.stream_id] = stream
        conn.owner.on_request(conn, stream, frame)
    elif stream is None:
        return  # a late frame for a stream that is finished or cancelled here: harmless
    elif ftype is FrameType.REPLY or ftype is FrameType.ERROR:
        reply = stream.reply
        # a second answer is a protocol error; an answer to a call we reset, or whose caller was cancelled
        # (its future is cancelled at once, the stream is dropped a loop turn later), is just late
        if reply is None or (reply.done() and not reply.cancelled() and stream.error is None):
            raise ProtocolError(f"unexpected {ftype.name} on stream {frame.stream_id}")
        if not reply.done():
            reply.set_result((ftype, frame.flags, frame.payload))
    elif ftype is FrameType.DATA:
        stream.on_data(frame.payload)
    elif ftype is FrameType.END:
        stream.on_end()
    elif ftype is FrameType.WINDOW:
        stream.on_window(frame.payload)
    elif ftype is FrameType.RESET:
        reason = bytes(frame.payload[:1000]).decode("utf-8", "replace")
        stream.fail(TransportError(f"{conn.peer_short} reset the stream {stream.method}: {reason}"))
