"""The refusal a listener at its connection limit sends in place of handshake message 2.

Wire form: one handshake-sized record, ``u16 length | REFUSAL_MAGIC | msgpack {"code": str, "message": str}``.
A real message 2 starts with a random X25519 public key, so it matches the 16-byte magic with probability
2**-128. The only code so far is ``at_connection_limit``; a dialler raises ``OverloadedError`` for it ("the peer
is at its connection limit") instead of the misleading "connection closed during the handshake".
After the handshake the same refusal travels as an ERROR frame on stream 0 with code ``overloaded``.
"""

from __future__ import annotations

from swarm.p2p.messages import packb, unpackb
from swarm.errors import HandshakeError, ProtocolError

REFUSAL_MAGIC = b"\x00swarm/refused/1"
AT_CONNECTION_LIMIT = "at_connection_limit"
MAX_REFUSAL_BYTES = 1024
AT_LIMIT_TEXT = "the peer is at its connection limit"


def encode_refusal(message: str, code: str = AT_CONNECTION_LIMIT) -> bytes:
    """The refusal record's body (without the length prefix)."""
    body = REFUSAL_MAGIC + packb({"code": code, "message": message[:400]})
    return body[:MAX_REFUSAL_BYTES]


def parse_refusal(record: bytes) -> tuple[str, str] | None:
    """``(code, message)`` if ``record`` is a refusal, None if it is something else (a real message 2)."""
    if not record.startswith(REFUSAL_MAGIC):
        return None
    if len(record) > MAX_REFUSAL_BYTES:
        raise HandshakeError(f"a refusal of {len(record)} bytes (max {MAX_REFUSAL_BYTES}); closing")
    try:
        obj = unpackb(record[len(REFUSAL_MAGIC) :], max_size_bytes=MAX_REFUSAL_BYTES)
    except ProtocolError as e:
        raise HandshakeError(f"a malformed refusal from the peer: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("code"), str) or not isinstance(obj.get("message"), str):
        raise HandshakeError("a malformed refusal from the peer: expected {code: str, message: str}")
    return obj["code"][:100], obj["message"][:400]
