"""Sealing one mux frame into encrypted, length-prefixed Noise records (the write side of a connection).

A frame that fits goes in one record. A larger one is split: the frame header (with a small leading buffer, the
message head, if there is one) in the first record, then each buffer in records of at most
``MAX_PLAINTEXT_BYTES``, each encrypted straight from its memory into one reused buffer (``WriteScratch``).
"""

from __future__ import annotations

from swarm.p2p.config import MAX_NOISE_MESSAGE_BYTES
from swarm.p2p.framing import FRAME_HEADER, FRAME_HEADER_BYTES, RECORD_PREFIX, Chunk, FrameType, WriteScratch
from swarm.p2p.noise import TAG_LEN, CipherState

MAX_PLAINTEXT_BYTES = MAX_NOISE_MESSAGE_BYTES - TAG_LEN
_MERGED_HEAD_BYTES = 4096  # a frame's first buffer up to this size goes in the frame header's record


def seal_frame(
    send: CipherState, scratch: WriteScratch, stream_id: int, ftype: FrameType, flags: int, payload: Chunk
) -> tuple[bytearray, memoryview]:
    """Encrypt one frame into records: (the buffer taken from ``scratch``, the view of its records).

    A tuple payload is sent as the concatenation of its buffers. Give the buffer back to ``scratch`` only once
    the socket took every byte of the view.
    """
    views = [memoryview(b).cast("B") for b in (payload if isinstance(payload, tuple) else (payload,))]
    size = sum(v.nbytes for v in views)
    header = FRAME_HEADER.pack(stream_id, ftype, flags, size)
    if size + FRAME_HEADER_BYTES <= MAX_PLAINTEXT_BYTES:
        pieces: list[bytes | memoryview] = [b"".join((header, *views))]
    else:
        pieces = [header]
        if views[0].nbytes <= _MERGED_HEAD_BYTES:  # a small leading buffer (a message head) shares a record
            pieces[0] = header + views.pop(0)
        pieces += [v[i : i + MAX_PLAINTEXT_BYTES] for v in views for i in range(0, v.nbytes, MAX_PLAINTEXT_BYTES)]
    total = sum(len(p) for p in pieces) + len(pieces) * (2 + TAG_LEN)
    out = scratch.take(total)
    out_view = memoryview(out)[:total]
    pos = 0
    for piece in pieces:
        n = len(piece) + TAG_LEN
        RECORD_PREFIX.pack_into(out_view, pos, n)
        send.encrypt_into(piece, out_view[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out, out_view
