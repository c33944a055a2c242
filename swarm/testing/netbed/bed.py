"""`Bed`: N emulated internet hosts on one Linux machine, each a network namespace with one TAP device, joined by
the link emulator (`swarm.testing.netbed.emulator`), for tests and benchmarks that need real round trips.

    with Bed(BedConfig(hosts=4, profile="wan")) as bed:
        proc = bed.popen(0, ["python", "-m", "swarm.cli.node", "start", "--listen", f"/ip4/{bed.address(0)}/tcp/0"])
        bed.set_link(2, bed.profile.link(loss=1.0))  # host 2's link drops everything (a Wi-Fi blip)
        bed.stats()  # bytes and frames each host sent and received, frames lost and dropped

The bed removes exactly what it created (its namespaces, the processes started in them, the emulator and so the
TAP devices) on `stop`, on leaving the ``with`` block, at interpreter exit and on SIGTERM (raised as SystemExit in
the main thread); after a crash (SIGKILL) ``python -m swarm.testing.netbed cleanup`` removes the leftovers.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from swarm.configs import Config, setting
from swarm.testing.netbed.emulator import host_address
from swarm.testing.netbed.namespaces import (
    NetbedError,
    create_namespace,
    enter_namespace,
    missing_requirements,
    namespace_name,
    remove_namespace,
)
from swarm.testing.netbed.profiles import PROFILES, LinkConfig, Profile

log = logging.getLogger(__name__)

_bed_numbers = itertools.count()
STOP_GRACE_S = 5.0  # how long a process gets between SIGTERM and SIGKILL


def stop_processes(procs: Sequence[subprocess.Popen[Any]], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM those of ``procs`` still running, then SIGKILL what is left after ``grace_s`` (all share one
    deadline)."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class BedConfig(Config, section="netbed"):
    """How many hosts, their profile, the TAP MTU, the hosts' subnet, the loss RNG's seed."""

    hosts: int = setting(default=4, ge=2, le=64, doc="Hosts (network namespaces), one TAP device each.")
    profile: str = setting(default="wan", choices=tuple(PROFILES), doc="Every host's link profile at start.")
    mtu: int = setting(
        default=16000, ge=1280, le=65521, doc="MTU of the TAP devices: large, so the emulator switches few frames."
    )
    subnet: str = setting(default="10.77.0", doc="The hosts' /24, as its first three octets (host i is .i+1).")
    seed: int = setting(default=0, ge=0, doc="Seed of the links' loss and jitter draws.")
    start_timeout_s: float = setting(default=30.0, gt=0, le=600, doc="Deadline of the emulator's start.")
    command_timeout_s: float = setting(default=10.0, gt=0, le=600, doc="Deadline of one emulator command.")

    def validate(self) -> None:
        octets = self.subnet.split(".")
        if len(octets) != 3 or not all(o.isdigit() and int(o) < 256 for o in octets):
            raise self.invalid("subnet", f"must be three octets like 10.77.0, got {self.subnet!r}")


class Bed:
    """The running bed (see the module doc). Not thread-safe: drive it from one thread."""

    def __init__(self, cfg: BedConfig | None = None) -> None:
        self.cfg = cfg or BedConfig()
        self.profile: Profile = PROFILES[self.cfg.profile]
        number = next(_bed_numbers)
        self.namespaces = [namespace_name(os.getpid(), number, i) for i in range(self.cfg.hosts)]
        self._created: list[str] = []
        self._started: list[subprocess.Popen[Any]] = []  # what popen started (it may not be in its namespace yet)
        self._emulator: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._old_sigterm: Any = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Bed:
        why = missing_requirements()
        if why is not None:
            raise NetbedError(why)
        atexit.register(self.stop)
        self._catch_sigterm()
        try:
            for name in self.namespaces:
                create_namespace(name)
                self._created.append(name)
            spec = {
                "namespaces": self.namespaces,
                "mtu": self.cfg.mtu,
                "subnet": self.cfg.subnet,
                "seed": self.cfg.seed,
                "links": [dataclasses.asdict(self.profile.link()) for _ in self.namespaces],
            }
            self._emulator = subprocess.Popen(
                [sys.executable, "-m", "swarm.testing.netbed", "emulate", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C reaches the owner, which stops it in order
            )
            ready = self._reply(time.monotonic() + self.cfg.start_timeout_s)
            if not ready.get("ready"):
                raise NetbedError(f"the emulator did not start: {ready}")
        except BaseException:
            self.stop()
            raise
        log.info("netbed: %d hosts up (%s), namespaces %s", self.cfg.hosts, self.profile.name, self.namespaces[0])
        return self

    def stop(self) -> None:
        """Stop every process in the hosts, the emulator (its TAPs go with it) and delete the namespaces."""
        self._stop_started()
        for name in self._created:
            try:
                remove_namespace(name)
            except (NetbedError, OSError, subprocess.SubprocessError) as e:
                log.warning("netbed: could not remove %s: %s", name, e)
        self._created.clear()
        emulator, self._emulator = self._emulator, None
        if emulator is not None:
            if emulator.stdin is not None:
                emulator.stdin.close()  # it exits when its stdin closes
            try:
                emulator.wait(timeout=5)
            except subprocess.TimeoutExpired:
                emulator.kill()
                emulator.wait()
            if emulator.stdout is not None:
                emulator.stdout.close()
        self._restore_sigterm()
        atexit.unregister(self.stop)

    def _stop_started(self) -> None:
        """Stop what `popen` started (`stop_processes`)."""
        stop_processes(self._started)
        self._started.clear()

    def __enter__(self) -> Bed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

            def on_sigterm(signum: int, frame: FrameType | None) -> None:
                raise SystemExit(128 + signum)

            self._old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # ------------------------------------------------------------ hosts

    def address(self, host: int) -> str:
        """Host ``host``'s IPv4 address (it exists only inside the bed's namespaces)."""
        return host_address(self.cfg.subnet, host)

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace (``ip netns exec``; it keeps the environment)."""
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def popen(self, host: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host ``host``; `stop` ends it if it still runs."""
        proc = subprocess.Popen(self.command(host, argv), **kwargs)
        self._started = [p for p in self._started if p.poll() is None] + [proc]
        return proc

    def run(self, host: int, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(host, argv), **kwargs)

    def enter(self, host: int) -> None:
        """Move the calling thread (and the threads it starts later) into host ``host``'s namespace."""
        enter_namespace(self.namespaces[host])

    # ------------------------------------------------------------ links

    def set_link(self, host: int, link: LinkConfig) -> None:
        """Change host ``host``'s access link now (frames already in flight keep their times)."""
        self._command({"op": "link", "host": host, "link": dataclasses.asdict(link)})

    def set_profile(self, profile: Profile, hosts: Sequence[int] | None = None) -> None:
        """Give ``hosts`` (all: None) ``profile``'s links; the bed's `profile` becomes it when all change."""
        for host in range(self.cfg.hosts) if hosts is None else hosts:
            self.set_link(host, profile.link())
        if hosts is None:
            self.profile = profile

    def stats(self) -> list[dict[str, int]]:
        """Per host: sent/received bytes and frames (Ethernet frames as on the TAP), frames lost, queue drops."""
        hosts: list[dict[str, int]] = self._command({"op": "stats"})["hosts"]
        return hosts

    def _command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        emulator = self._emulator
        if emulator is None or emulator.stdin is None:
            raise NetbedError("the bed is not running")
        try:
            emulator.stdin.write(json.dumps(cmd).encode() + b"\n")
            emulator.stdin.flush()
        except BrokenPipeError:
            raise NetbedError(f"the emulator exited (code {emulator.poll()})") from None
        reply = self._reply(time.monotonic() + self.cfg.command_timeout_s)
        if not reply.get("ok"):
            raise NetbedError(f"the emulator refused {cmd['op']}: {reply.get('error')}")
        return reply

    def _reply(self, deadline: float) -> dict[str, Any]:
        """The emulator's next output line, as JSON; NetbedError when it exits or the deadline passes."""
        emulator = self._emulator
        if emulator is None or emulator.stdout is None:
            raise NetbedError("the bed is not running")
        fd = emulator.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetbedError("the emulator did not answer in time")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise NetbedError(f"the emulator exited (code {emulator.wait()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply
