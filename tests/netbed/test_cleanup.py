"""The bed removes exactly what it created: on leaving its block, on SIGTERM, and after a SIGKILL through
``python -m swarm.testing.netbed cleanup``, which leaves a live bed alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from swarm.testing.netbed import Bed, BedConfig
from swarm.testing.netbed.namespaces import list_namespaces

pytestmark = [pytest.mark.integration]

OWNER = """
import json, signal, subprocess, sys, time
from swarm.testing.netbed import Bed, BedConfig
# Python's usual SIGINT handling, as in a script started from a shell: a background job of a non-interactive shell
# (a CI runner's) starts with SIGINT ignored, which the owner would inherit and then never see the signal
signal.signal(signal.SIGINT, signal.default_int_handler)
bed = Bed(BedConfig(hosts=2)).start()
sleeper = bed.popen(0, ["sleep", "600"])
deadline = time.monotonic() + 30
while str(sleeper.pid) not in subprocess.run(["ip", "netns", "pids", bed.namespaces[0]], capture_output=True,
                                             text=True).stdout.split():  # until it is inside its host
    assert time.monotonic() < deadline, "the sleeper never entered its namespace"
    time.sleep(0.02)
print(json.dumps({"namespaces": bed.namespaces, "sleeper": sleeper.pid}), flush=True)
time.sleep(600)
"""


def _start_owner() -> tuple[subprocess.Popen[str], list[str], int]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    info = json.loads(owner.stdout.readline())
    return owner, info["namespaces"], info["sleeper"]


def _gone(pid: int, deadline_s: float = 30.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_leaving_the_block_removes_the_namespaces_and_their_processes() -> None:
    with Bed(BedConfig(hosts=2)) as bed:
        names = bed.namespaces
        assert set(names) <= set(list_namespaces())
        sleeper = bed.popen(1, ["sleep", "600"])
    assert not set(names) & set(list_namespaces())
    assert sleeper.wait(timeout=5) is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_owner_removes_its_bed(sig: signal.Signals) -> None:
    owner, names, sleeper = _start_owner()
    try:
        owner.send_signal(sig)
        owner.wait(timeout=60)
        assert not set(names) & set(list_namespaces())
        assert _gone(sleeper)
    finally:
        owner.kill()
        owner.wait()


def test_cleanup_removes_a_killed_beds_leftovers_and_leaves_a_live_bed() -> None:
    owner, names, sleeper = _start_owner()
    try:
        with Bed(BedConfig(hosts=2)) as live:
            owner.kill()
            owner.wait()
            assert set(names) <= set(list_namespaces())  # SIGKILL: nothing could clean up
            done = subprocess.run(
                [sys.executable, "-m", "swarm.testing.netbed", "cleanup"], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
            assert not set(names) & set(list_namespaces())
            assert _gone(sleeper)
            assert set(live.namespaces) <= set(list_namespaces())
    finally:
        owner.kill()
        owner.wait()
