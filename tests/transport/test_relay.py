"""Circuit relays on loopback: end-to-end Noise through the relay, limits, expiry, a forged circuit, moving on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from swarm.errors import PeerIDMismatchError, RemoteError, TransportError
from swarm.p2p import Transport
from swarm.p2p.autonat import AutoNatServer
from swarm.p2p.circuit import CircuitRecord, CircuitRefusedError, RelayLimitError
from swarm.p2p.maddr import PeerAddress, circuit_address, parse_maddr
from swarm.p2p.reach_messages import ReserveReply, ReserveRequest
from swarm.p2p.reachability import Reachability, ReachabilityConfig, Status
from swarm.p2p.relay import RelayConfig, RelayService
from swarm.p2p.relays import RelaySet
from swarm.p2p.splice import TokenBucket
from swarm.p2p.rpc import RpcContext
from tests.transport.conftest import Echo, MakeTransport

MARKER = "PLAINTEXT-MARKER-7f3a"


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def direct(t: Transport) -> PeerAddress:
    return parse_maddr(t.listen_maddrs[0])


async def echo(ctx: RpcContext, req: Echo) -> Echo:
    return Echo(text=req.text, number=req.number + 1)


async def relayed_peer(make: MakeTransport, relay: Transport, name: str) -> tuple[Transport, RelaySet]:
    """A dial-only peer (nobody can dial it) holding a reservation at ``relay``, serving ``echo``."""
    peer = await make(name, listen_maddrs=())
    peer.register("echo", Echo, echo)
    peer.add_addresses(relay.peer_id, [direct(relay)])
    relays = RelaySet(peer, count=1, retry_s=1.0, timeout_s=3.0)
    relays.start()
    await relays.maintain([relay.peer_id])
    assert relays.relays == [relay.peer_id]
    return peer, relays


@pytest.fixture
async def services() -> AsyncIterator[list[RelayService]]:
    started: list[RelayService] = []
    yield started
    for service in started:
        await service.stop()


async def test_circuit_carries_calls_end_to_end_encrypted(
    make_transport: MakeTransport, services: list[RelayService]
) -> None:
    relay = await make_transport("relay")
    seen: list[bytes] = []
    service = RelayService(RelayConfig(), relay, tap=seen.append)
    service.start()
    services.append(service)
    peer, _ = await relayed_peer(make_transport, relay, "behind-nat")
    dialler = await make_transport("dialler", listen_maddrs=())
    addr = circuit_address(direct(relay), peer.peer_id)
    assert parse_maddr(addr.to_maddr()) == addr and "/p2p-circuit/p2p/" in addr.to_maddr()
    for i in range(3):
        reply = await dialler.call(addr, "echo", Echo(text=MARKER * 50, number=i), Echo)
        assert reply.text == MARKER * 50 and reply.number == i + 1
    relayed = b"".join(seen)
    assert len(relayed) > 3 * len(MARKER) * 50  # the calls crossed the relay ...
    assert MARKER.encode() not in relayed  # ... as ciphertext only
    assert service.stats()["circuits"] == 1  # one circuit, reused for every call


async def test_over_limit_circuit_is_refused_with_a_code(
    make_transport: MakeTransport, services: list[RelayService]
) -> None:
    relay = await make_transport("relay")
    service = RelayService(RelayConfig(max_circuits=2), relay)
    service.start()
    services.append(service)
    peer, _ = await relayed_peer(make_transport, relay, "behind-nat")
    addr = circuit_address(direct(relay), peer.peer_id)
    for i in range(2):
        dialler = await make_transport(f"dialler-{i}", listen_maddrs=())
        assert (await dialler.call(addr, "echo", Echo(number=i), Echo)).number == i + 1
    third = await make_transport("dialler-3", listen_maddrs=())
    with pytest.raises(RelayLimitError, match="max_circuits=2") as err:
        await third.call(addr, "echo", Echo(), Echo)
    assert err.value.code == "relay_limit"


async def test_reservations_expire_and_are_bounded(make_transport: MakeTransport, services: list[RelayService]) -> None:
    relay = await make_transport("relay")
    clock = FakeClock()
    service = RelayService(RelayConfig(reservation_ttl_s=30.0, max_reservations=1), relay, clock=clock)
    service.start()
    services.append(service)
    peer, _ = await relayed_peer(make_transport, relay, "behind-nat")
    other = await make_transport("second", listen_maddrs=())
    with pytest.raises(RemoteError) as err:  # the one reservation slot is taken
        await other.call(direct(relay), "relay.reserve", ReserveRequest(), ReserveReply)
    assert err.value.code == "relay_limit"
    dialler = await make_transport("dialler", listen_maddrs=())
    addr = circuit_address(direct(relay), peer.peer_id)
    clock.now_s += 31.0  # not renewed: expired
    with pytest.raises(CircuitRefusedError, match="no_reservation") as refused:
        await dialler.call(addr, "echo", Echo(), Echo)
    assert refused.value.code == "circuit_refused"
    assert service.stats()["reservations"] == 0


async def test_forged_circuit_fails_the_identity_check(make_transport: MakeTransport) -> None:
    """A relay that answers the circuit itself (posing as the peer) cannot prove the peer's PeerID."""
    forger = await make_transport("forger")
    victim = await make_transport("victim", listen_maddrs=())
    forger_addr = direct(forger)

    async def pose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        await reader.readexactly(size)  # the connect record
        ok = CircuitRecord(op="ok").encode()
        writer.write(len(ok).to_bytes(2, "big") + ok)
        up_reader, up_writer = await asyncio.open_connection(forger_addr.host, forger_addr.port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(pose, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        fake_relay = PeerAddress(host="127.0.0.1", port=port, peer_id=forger.peer_id)
        dialler = await make_transport("dialler", listen_maddrs=())
        with pytest.raises(PeerIDMismatchError, match="proved to be"):
            await dialler.connect(circuit_address(fake_relay, victim.peer_id))
    finally:
        server.close()
        await server.wait_closed()


async def test_no_relay_service_is_a_coded_refusal(make_transport: MakeTransport) -> None:
    plain = await make_transport("plain")
    dialler = await make_transport("dialler", listen_maddrs=())
    target = await make_transport("target", listen_maddrs=())
    with pytest.raises(CircuitRefusedError, match="relay_unavailable"):
        await dialler.connect(circuit_address(direct(plain), target.peer_id))


FAST = ReachabilityConfig(probe_interval_s=0.2, tick_s=0.1, relay_retry_s=1.0, dial_back_timeout_s=2.0)


async def test_relayed_node_moves_to_another_relay(make_transport: MakeTransport) -> None:
    """Public peers learn they are public; a peer nobody can dial learns it is not, announces only circuit
    addresses through two relays, and when one relay dies it is still reached (through the other) and
    reserves at a third."""
    nodes: list[tuple[Transport, Reachability, RelayService, AutoNatServer]] = []
    for i in range(4):
        t = await make_transport(f"node-{i}", listen_maddrs=() if i == 3 else ("/ip4/127.0.0.1/tcp/0",))
        reach = Reachability(FAST, t)
        service = RelayService(RelayConfig(), t, accepting=lambda r=reach: r.public)  # type: ignore[misc]
        autonat = AutoNatServer(t, dial_timeout_s=2.0)
        autonat.start()
        service.start()
        nodes.append((t, reach, service, autonat))
    for t, *_ in nodes:
        for u, *_ in nodes:
            if u is not t and u.listen_maddrs:
                t.add_addresses(u.peer_id, [direct(u)])
    behind, reach_p = nodes[3][0], nodes[3][1]
    behind.register("echo", Echo, echo)
    try:
        for _, reach, _, _ in nodes:
            reach.start()
        async with asyncio.timeout(20):
            while not (all(r.public for _, r, _, _ in nodes[:3]) and len(reach_p.relays.relays) == 2):
                await asyncio.sleep(0.05)
        assert reach_p.status is Status.RELAYED and behind.reachability == "relayed"
        assert all("/p2p-circuit/" in m for m in behind.advertised_maddrs) and len(behind.advertised_maddrs) == 2
        assert nodes[0][0].advertised_maddrs == nodes[0][0].listen_maddrs

        caller = await make_transport("caller", listen_maddrs=(), rpc_timeout_s=3.0)
        caller.add_addresses(behind.peer_id, [parse_maddr(m) for m in behind.advertised_maddrs])
        assert (await caller.call(behind.peer_id, "echo", Echo(number=1), Echo)).number == 2
        first, second = reach_p.relays.relays
        dead = next(n for n in nodes if n[0].peer_id == first)
        await dead[1].stop()
        await dead[2].stop()
        await dead[0].stop()
        await caller.disconnect(behind.peer_id)  # the next call dials a new circuit: the dead relay's fails fast
        async with asyncio.timeout(caller.config.rpc_timeout_s):
            assert (await caller.call(behind.peer_id, "echo", Echo(number=5), Echo)).number == 6
        async with asyncio.timeout(10):
            while first in reach_p.relays.relays or len(reach_p.relays.relays) < 2:
                await asyncio.sleep(0.05)
        assert second in reach_p.relays.relays
        assert all(first.to_base58() not in m for m in behind.advertised_maddrs)
    finally:
        for _, reach, service, autonat in nodes:
            await reach.stop()
            await service.stop()
            autonat.stop()


def test_announce_takes_direct_addresses_only() -> None:
    relay_id = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    with pytest.raises(ValueError, match=r"reachability\.announce"):
        ReachabilityConfig(announce=(f"/ip4/1.2.3.4/tcp/1/p2p/{relay_id}/p2p-circuit",))
    with pytest.raises(ValueError, match=r"reachability\.announce"):
        ReachabilityConfig(announce=("/ip4/1.2.3.4/udp/1",))
    assert ReachabilityConfig(announce=("/ip4/1.2.3.4/tcp/1",)).announce == ("/ip4/1.2.3.4/tcp/1",)


async def test_circuit_bytes_and_duration_are_bounded(
    make_transport: MakeTransport, services: list[RelayService]
) -> None:
    """A circuit over its byte budget or its duration is closed; the next call opens a new one."""
    relay = await make_transport("relay")
    service = RelayService(RelayConfig(max_circuit_bytes=64 * 1024, max_circuit_duration_s=0.5), relay)
    service.start()
    services.append(service)
    peer, _ = await relayed_peer(make_transport, relay, "behind-nat")
    dialler = await make_transport("dialler", listen_maddrs=())
    addr = circuit_address(direct(relay), peer.peer_id)
    with pytest.raises(TransportError, match="closed"):  # over max_circuit_bytes mid-call: the circuit closes
        await dialler.call(addr, "echo", Echo(text="x" * 100_000), Echo)
    assert service.stats()["circuits"] == 0 and service.bytes_relayed > 64 * 1024
    assert (await dialler.call(addr, "echo", Echo(number=7), Echo)).number == 8  # a new circuit
    assert service.stats()["circuits"] == 1
    async with asyncio.timeout(5):  # over max_circuit_duration_s: closed
        while service.stats()["circuits"]:
            await asyncio.sleep(0.01)


def test_token_bucket_paces_to_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_bytes_per_s=1000.0, burst_bytes=500.0, clock=clock)
    assert bucket.take(500) == 0.0  # the burst
    assert bucket.take(250) == pytest.approx(0.25)  # 250 bytes over: wait 0.25 s
    clock.now_s += 0.25
    assert bucket.take(0) == 0.0
    clock.now_s += 10.0  # refills up to the burst only
    assert bucket.take(500) == 0.0 and bucket.take(1) > 0
