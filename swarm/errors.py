"""The one error hierarchy of swarm, and the machine-readable codes that cross the wire.

Every error a user can see says what happened and what to do. Every :class:`SwarmError` subclass carries a
stable ``code``: a short ASCII token (``[a-z][a-z0-9_]{0,31}``) that an RPC error reply carries, so a caller
decides on the code (``RemoteError.code``), never on the message text. A class declares its code in its own
body; defining it registers the code as known (errors of higher layers, e.g. ``StaleStepError``, register
theirs when their module is imported). A code from a peer that is malformed or unknown here is read as
:data:`GENERIC_CODE`.

This module imports nothing from the project, so every layer may import it without pointing "up" the layer
stack.
"""

from __future__ import annotations

import re

CODE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_CODE_CHARS = 32
GENERIC_CODE = "failed"  # a SwarmError without a more specific code, and any code a peer sends that we do not know

_known_codes: set[str] = set()


def is_valid_code(code: object) -> bool:
    """Whether ``code`` is a well-formed error code: a str token of ``[a-z][a-z0-9_]``, at most 32 characters."""
    return isinstance(code, str) and CODE_PATTERN.fullmatch(code) is not None


def register_code(code: str) -> str:
    """Make ``code`` known (a programming error, TypeError, if it is not a valid token); return it."""
    if not is_valid_code(code):
        raise TypeError(f"error code {code!r} is not a token of [a-z][a-z0-9_] of at most {MAX_CODE_CHARS} characters")
    _known_codes.add(code)
    return code


def known_code(code: object) -> str:
    """``code`` if it is valid and known here, else :data:`GENERIC_CODE` (how a peer's code is read)."""
    return code if isinstance(code, str) and code in _known_codes else GENERIC_CODE


class SwarmError(Exception):
    """Base class of every error raised by swarm on purpose."""

    code: str = GENERIC_CODE

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            register_code(cls.__dict__["code"])


register_code(SwarmError.code)


class ConfigError(SwarmError, ValueError):
    """A configuration value is invalid; the message names the field and the accepted range."""

    code = "config"


class IdentityError(SwarmError):
    """A key file or PeerID cannot be read, parsed or verified."""

    code = "identity"


class AddressError(SwarmError, ValueError):
    """A multiaddr is malformed or uses an unsupported protocol."""

    code = "address"


class ProtocolError(SwarmError):
    """A peer sent bytes that do not form a valid message; the request or connection is dropped."""

    code = "bad_request"


class FrameTooLargeError(ProtocolError):
    """A frame header announced more bytes than the configured maximum."""

    code = "frame_too_large"


class HandshakeError(SwarmError):
    """The secure handshake failed: wrong key, bad signature, timeout or garbage."""

    code = "handshake"


class PeerIDMismatchError(HandshakeError):
    """The peer at a dialled address proved a different PeerID than the one in the multiaddr."""

    code = "peer_id_mismatch"


class TransportError(SwarmError):
    """A connection could not be made, or broke while a request was in flight."""

    code = "transport"


class RpcTimeoutError(TransportError, TimeoutError):
    """A request did not get an answer before its deadline."""

    code = "timeout"


class RemoteError(SwarmError):
    """The remote peer answered a request with an error; the message is the peer's, ``code`` its error code.

    ``code`` is the peer's code as read at the edge (:func:`known_code`): decide on it, never on the message.
    """

    code = "remote"

    def __init__(self, message: str, *, code: str = GENERIC_CODE) -> None:
        super().__init__(message)
        self.code = known_code(code)


class OverloadedError(TransportError):
    """Too many connections or in-flight requests; retry later or on another peer."""

    code = "overloaded"


class CodecError(SwarmError):
    """A tensor payload cannot be encoded or decoded: corrupt, truncated or over the limits."""

    code = "codec"


class RecordError(SwarmError):
    """A DHT record is malformed, expired, unsigned or fails its validator."""

    code = "record"


class NotFoundError(SwarmError, LookupError):
    """No peer, key or record was found."""

    code = "not_found"


class BootstrapError(SwarmError):
    """None of the initial peers answered, so the node could not join the swarm."""

    code = "bootstrap"


class VerificationError(SwarmError):
    """A receipt, verdict or attestation is invalid."""

    code = "verification"
