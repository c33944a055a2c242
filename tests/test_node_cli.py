"""`swarm-node start`: real processes on 127.0.0.1 join, log each peer, and stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.p2p.identity import Identity
from swarm.p2p.maddr import parse_maddr
from swarm.p2p import TransportConfig
from swarm.errors import ConfigError, IdentityError
from swarm.local.events import EventReader, ListeningEvent, NodeEventError
from swarm.node import Node, NodeConfig

NODE_CMD = [sys.executable, "-c", "from swarm.cli.node import main; main()", "start"]
DEADLINE_S = 60


def _spawn(*args: str, events: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    events_args = ["--events-file", str(events)] if events is not None else []
    return subprocess.Popen(
        [*NODE_CMD, *args, *events_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _listening_maddr(proc: subprocess.Popen[str], events: Path) -> str:
    """The first multiaddr of the node's ``listening`` event (reported as soon as it listens)."""
    try:
        event = EventReader(events).wait_for_blocking(
            ListeningEvent, alive=lambda: proc.poll() is None, timeout_s=DEADLINE_S
        )
    except (NodeEventError, TimeoutError) as e:
        proc.kill()
        _, err = proc.communicate(timeout=DEADLINE_S)
        raise AssertionError(f"expected a 'listening' event first ({e}); stderr:\n{err[-3000:]}") from None
    return event.maddrs[0]


def _stop(proc: subprocess.Popen[str], sig: int) -> tuple[int, str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=DEADLINE_S)
    return proc.returncode, out, err


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_two_nodes_join_and_stop_cleanly(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        first = _spawn("--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(tmp_path / "a"), events=tmp_path / "a.ev")
        procs.append(first)
        first_maddr = _listening_maddr(first, tmp_path / "a.ev")
        first_id = parse_maddr(first_maddr).peer_id
        assert first_id == Identity.load(tmp_path / "a" / "identity.pem").peer_id
        assert (tmp_path / "a" / "identity.pem").stat().st_mode & 0o777 == 0o600

        key = tmp_path / "b.pem"
        Identity.from_seed(b"\x02" * 32).save(key)
        second = _spawn(
            "--data-dir",
            str(tmp_path / "b"),
            "--identity",
            str(key),
            "--initial-peers",
            first_maddr,
            events=tmp_path / "b.ev",
        )
        procs.append(second)
        second_maddr = _listening_maddr(second, tmp_path / "b.ev")
        second_id = parse_maddr(second_maddr).peer_id
        assert second_id == Identity.load(key).peer_id
        assert second.stderr is not None
        for line in second.stderr:  # bounded by the test timeout; the join is logged within a second
            if "connected to peer" in line:
                assert first_id.short() in line
                break

        rc2, out2, err2 = _stop(second, signal.SIGTERM)
        rc1, out1, err1 = _stop(first, signal.SIGINT)
        assert (rc1, rc2) == (0, 0)
        # the line for people comes first on stdout; programs read the events
        assert out1.startswith(f"listening on {first_maddr}") and out2.startswith(f"listening on {second_maddr}")
        assert "Traceback" not in err1 + err2
        assert f"connected to peer {second_id.short()}" in err1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=DEADLINE_S)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_missing_identity_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = _spawn("--data-dir", str(tmp_path), "--identity", str(tmp_path / "nope.pem"))
    try:
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 1
    assert "error: cannot read identity file" in err and "Traceback" not in err


async def test_node_in_process_joins_and_stops(tmp_path: Path) -> None:
    config = lambda name, peers=(): NodeConfig(  # noqa: E731
        transport=TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",)),
        initial_peers=peers,
        data_dir=tmp_path / name,
    )
    first = Node(config("a"))
    first_stop = asyncio.Event()
    listening: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
    async with asyncio.timeout(30):
        first_task = asyncio.create_task(first.run(first_stop, on_listening=listening.set_result))
        maddrs = await listening
        second = Node(config("b", peers=(maddrs[0], "/ip4/127.0.0.1/tcp/1/p2p/" + first.peer_id.to_base58())))
        await second.start()
        await second._join()  # one reachable peer, one refused port: logged, not fatal
        assert second.transport is not None and second.transport.connected_peers() == [first.peer_id]
        await second.stop()
        first_stop.set()
        await first_task
    assert first.transport is not None and first.transport.connected_peers() == []


def test_node_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="initial_peers"):
        NodeConfig(initial_peers=("not-a-maddr",))
    with pytest.raises(ConfigError, match="data_dir"):
        NodeConfig(data_dir="relative/str")  # type: ignore[arg-type]
    assert NodeConfig(data_dir=tmp_path).key_path == tmp_path / "identity.pem"


async def test_node_with_missing_identity_path_fails_clearly(tmp_path: Path) -> None:
    node = Node(NodeConfig(data_dir=tmp_path, identity_path=tmp_path / "missing.pem"))
    with pytest.raises(IdentityError, match="cannot read identity file"):
        await node.start()
    await node.stop()
