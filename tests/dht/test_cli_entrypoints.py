"""The CLIs start both ways: as console-script entry points and as ``python -m <module>``."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from swarm.cli.dht import main

TIMEOUT_S = 60


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=TIMEOUT_S)


def test_python_m_swarm_dht_lists_every_command() -> None:
    # run as __main__, swarm/cli/dht.py is loaded a second time: the commands of other modules must still be there
    done = _run_module("swarm.cli.dht", "--help")
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("Commands:")[1].split()
    for name in ("attestations", "stages", "peers", "get", "put", "routing-table"):
        assert name in commands, done.stdout


def test_console_script_group_has_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    assert {"attestations", "stages", "peers", "get", "put", "routing-table"} <= set(main.commands)


def test_python_m_swarm_node_help() -> None:
    done = _run_module("swarm.cli.node", "--help")
    assert done.returncode == 0, done.stderr
    assert "start" in done.stdout.split("Commands:")[1].split()
