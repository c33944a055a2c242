"""`swarm-node local` start-up errors name their cause: a node that cannot join because node 0 is gone says so."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from swarm.errors import SwarmError
from swarm.local.launcher import LaunchConfig, NodeProcess, _start_after_bootstrap


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_a_node_that_cannot_join_a_gone_node_0_names_node_0(tmp_path: Path) -> None:
    # node 0 stands in for one that resumed a finished run's checkpoint and stopped at once: it has exited and
    # its address answers nothing
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    async with asyncio.timeout(30):
        await gone.wait()
    with socket.socket() as closed_port:  # bound, never listening: a connection to it is refused
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        node0 = NodeProcess(
            index=0,
            proc=gone,
            folder=tmp_path / "node-0",
            maddr=f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWD4oUCEqMkJoy8GnVejN4YbdsgCiy778xScgZ7SrMn5QN",
        )
        cfg = LaunchConfig(num_nodes=2, steps=3, run_dir=tmp_path, start_timeout_s=60.0)
        with pytest.raises(SwarmError) as caught:
            async with asyncio.timeout(90):
                await _start_after_bootstrap(cfg, tmp_path, 1, [node0], ())
    message = str(caught.value)
    assert "node 1 exited with code 1 while starting" in message
    assert "node 0, its initial peer, had already exited (code 0)" in message
    assert "use a new --run-dir or more --steps" in message
