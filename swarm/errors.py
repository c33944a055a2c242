"""The one error hierarchy of swarm.

Every error a user can see says what happened and what to do. This module imports nothing from
the project, so every layer may import it without pointing "up" the layer stack.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error raised by swarm on purpose."""


class ConfigError(SwarmError, ValueError):
    """A configuration value is invalid; the message names the field and the accepted range."""


class IdentityError(SwarmError):
    """A key file or PeerID cannot be read, parsed or verified."""


class AddressError(SwarmError, ValueError):
    """A multiaddr is malformed or uses an unsupported protocol."""


class ProtocolError(SwarmError):
    """A peer sent bytes that do not form a valid message; the request or connection is dropped."""


class FrameTooLargeError(ProtocolError):
    """A frame header announced more bytes than the configured maximum."""


class HandshakeError(SwarmError):
    """The secure handshake failed: wrong key, bad signature, timeout or garbage."""


class PeerIDMismatchError(HandshakeError):
    """The peer at a dialled address proved a different PeerID than the one in the multiaddr."""


class TransportError(SwarmError):
    """A connection could not be made, or broke while a request was in flight."""


class RpcTimeoutError(TransportError, TimeoutError):
    """A request did not get an answer before its deadline."""


class RemoteError(SwarmError):
    """The remote peer answered a request with an error; the message is the peer's."""


class OverloadedError(TransportError):
    """Too many connections or in-flight requests; retry later or on another peer."""


class CodecError(SwarmError):
    """A tensor payload cannot be encoded or decoded: corrupt, truncated or over the limits."""


class RecordError(SwarmError):
    """A DHT record is malformed, expired, unsigned or fails its validator."""


class NotFoundError(SwarmError, LookupError):
    """No peer, key or record was found."""


class BootstrapError(SwarmError):
    """None of the initial peers answered, so the node could not join the swarm."""


class VerificationError(SwarmError):
    """A receipt, verdict or attestation is invalid."""
