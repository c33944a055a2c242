"""The bed's tests need root, `ip` and /dev/net/tun; elsewhere every test here is skipped with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from swarm.testing.netbed import Bed, BedConfig, missing_requirements

PROBE = [sys.executable, "-m", "swarm.testing.netbed.probe"]
PROBE_PORT = 5201


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = missing_requirements()
    if why is not None:
        for item in items:
            if "tests/netbed" in str(item.path):
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    """Three hosts; host 1 runs the probe server. Tests set the links they measure."""
    with Bed(BedConfig(hosts=3, profile="wan", seed=7)) as bed:
        server = bed.popen(1, [*PROBE, "serve", "--port", str(PROBE_PORT)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            assert json.loads(server.stdout.readline()) == {"serving": PROBE_PORT}
            yield bed
        finally:
            server.kill()
            server.wait()


def probe(bed: Bed, host: int, *args: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Run a probe client on ``host`` against host 1's server; its JSON answer."""
    done = bed.run(
        host,
        [*PROBE, *args, "--host", bed.address(1), "--port", str(PROBE_PORT)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
