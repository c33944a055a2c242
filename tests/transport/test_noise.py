"""Noise XX: interop with the independent `noiseprotocol` package, tampering, identity binding."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.p2p.identity import Identity
from swarm.p2p.maddr import parse_maddr
from swarm.p2p.framing import FRAME_HEADER, RECORD_PREFIX, FrameType
from swarm.p2p.noise import (
    PROLOGUE,
    PROTOCOL_NAME,
    HandshakeState,
    make_payload,
    verify_payload,
)
from swarm.errors import HandshakeError, ProtocolError
from tests.transport.conftest import MakeTransport, seeded_identity

noise_connection = pytest.importorskip("noise.connection")


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _reference(initiator: bool, key: X25519PrivateKey):  # type: ignore[no-untyped-def]
    conn = noise_connection.NoiseConnection.from_name(PROTOCOL_NAME)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_keypair_from_private_bytes(noise_connection.Keypair.STATIC, _raw(key))
    conn.set_prologue(PROLOGUE)
    conn.start_handshake()
    return conn


def test_our_initiator_against_reference_responder() -> None:
    ours = HandshakeState(initiator=True, static_key=X25519PrivateKey.generate())
    ref = _reference(False, X25519PrivateKey.generate())
    assert ref.read_message(ours.write_message(b"")) == b""
    assert ours.read_message(ref.write_message(b"from responder")) == b"from responder"
    assert bytes(ref.read_message(ours.write_message(b"from initiator"))) == b"from initiator"
    assert ref.handshake_finished and ours.handshake_hash == ref.get_handshake_hash()
    send, recv = ours.split()
    assert ref.decrypt(send.encrypt_with_ad(b"", b"ping")) == b"ping"
    assert recv.decrypt_with_ad(b"", ref.encrypt(b"pong")) == b"pong"


def test_our_responder_against_reference_initiator() -> None:
    ours = HandshakeState(initiator=False, static_key=X25519PrivateKey.generate())
    ref = _reference(True, X25519PrivateKey.generate())
    assert ours.read_message(ref.write_message(b"")) == b""
    assert bytes(ref.read_message(ours.write_message(b"r"))) == b"r"
    assert ours.read_message(ref.write_message(b"i")) == b"i"
    send, recv = ours.split()
    assert ref.decrypt(send.encrypt_with_ad(b"", b"x" * 1000)) == b"x" * 1000
    assert recv.decrypt_with_ad(b"", ref.encrypt(b"y")) == b"y"


def test_tampered_handshake_message_is_rejected() -> None:
    a = HandshakeState(initiator=True, static_key=X25519PrivateKey.generate())
    b = HandshakeState(initiator=False, static_key=X25519PrivateKey.generate())
    b.read_message(a.write_message(b""))
    message = bytearray(b.write_message(b"payload"))
    message[40] ^= 1  # inside the encrypted static key
    with pytest.raises(HandshakeError):
        a.read_message(bytes(message))


def test_short_handshake_message_is_rejected() -> None:
    b = HandshakeState(initiator=False, static_key=X25519PrivateKey.generate())
    with pytest.raises(HandshakeError):
        b.read_message(b"\x01" * 10)


def test_transport_message_tampering_is_detected() -> None:
    a = HandshakeState(initiator=True, static_key=X25519PrivateKey.generate())
    b = HandshakeState(initiator=False, static_key=X25519PrivateKey.generate())
    b.read_message(a.write_message(b""))
    a.read_message(b.write_message(b""))
    b.read_message(a.write_message(b""))
    a_send, _ = a.split()
    _, b_recv = b.split()
    ciphertext = bytearray(a_send.encrypt_with_ad(b"", b"secret"))
    ciphertext[0] ^= 0x80
    with pytest.raises(ProtocolError):
        b_recv.decrypt_with_ad(b"", bytes(ciphertext))


def test_identity_payload_binds_the_static_key() -> None:
    identity = Identity.from_seed(b"\x07" * 32)
    static = X25519PrivateKey.generate()
    static_pub = static.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    payload = make_payload(identity, static)
    assert verify_payload(payload, static_pub) == identity.peer_id
    other_pub = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    with pytest.raises(HandshakeError, match="does not match its Noise static key"):
        verify_payload(payload, other_pub)
    with pytest.raises(HandshakeError, match="malformed identity payload"):
        verify_payload(b"\x93garbage", static_pub)


async def test_reference_client_talks_to_a_transport(make_transport: MakeTransport) -> None:
    """The independent implementation dials a real Transport: handshake, identity binding, encrypted frames."""
    server = await make_transport("server")
    addr = parse_maddr(server.listen_maddrs[0])
    static = X25519PrivateKey.generate()
    ref = _reference(True, static)
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(addr.host, addr.port)

        async def read_record() -> bytes:
            return await reader.readexactly(RECORD_PREFIX.unpack(await reader.readexactly(2))[0])

        def write_record(data: bytes) -> None:
            writer.write(RECORD_PREFIX.pack(len(data)) + data)

        write_record(ref.write_message(b""))
        payload = bytes(ref.read_message(await read_record()))
        remote_static = ref.noise_protocol.handshake_state.rs.public_bytes  # the library's handshake state
        assert verify_payload(payload, remote_static) == server.peer_id
        write_record(ref.write_message(make_payload(seeded_identity("client"), static)))
        assert ref.handshake_finished
        write_record(ref.encrypt(FRAME_HEADER.pack(0, FrameType.PING, 0, 8) + b"refping!"))
        pong = bytes(ref.decrypt(await read_record()))
        assert pong == FRAME_HEADER.pack(0, FrameType.PONG, 0, 8) + b"refping!"
        writer.close()
