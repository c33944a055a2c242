"""The bed's link emulator: one process holds every host's TAP device and switches Ethernet frames between them.

A frame a host sends crosses the sender's uplink, then the receiver's downlink (`Direction`): each may lose it
(seeded, per crossing), queues it behind the frames still being serialized at the direction's rate (drop-tail,
about one bandwidth-delay product), then delays it by the link's delay plus jitter, never before the previous
frame of that direction (no reordering). Hosts have fixed MAC addresses (`host_mac`) and static neighbour
entries, so a frame's destination MAC names its host; broadcasts go to every other host.

Run by `swarm.testing.netbed.bed.Bed` as ``python -m swarm.testing.netbed emulate SPEC_JSON``. It prints one
``{"ready": true}`` line once the devices are up, then answers one JSON line per command read from stdin
(``{"op": "link", "host": i, "link": {...}}``, ``{"op": "stats"}``, ``{"op": "stop"}``), and exits when stdin
closes (its owner is gone).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import random
import select
import sys
import time
from dataclasses import dataclass
from typing import Any

from swarm.configs import build
from swarm.testing.netbed.namespaces import TAP_NAME, ip, open_tap
from swarm.testing.netbed.profiles import LinkConfig

ETH_HEADER_BYTES = 14
READS_PER_WAKE = 64  # frames read from one TAP before the others get a turn
EMULATOR_NICE = -10  # the emulator's scheduling priority (root may raise it)


def host_mac(host: int) -> str:
    return f"02:77:00:00:{host >> 8:02x}:{host & 0xFF:02x}"


def host_address(subnet: str, host: int) -> str:
    """Host ``host``'s IPv4 address in ``subnet`` (a /24 written as its first three octets, ``10.77.0``)."""
    return f"{subnet}.{host + 1}"


@dataclass
class Direction:
    """One direction of one access link: loss, a drop-tail queue at ``rate``, then a delay."""

    rng: random.Random
    rate_bps: float = 1e9
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    queue_bytes: int = 1 << 20
    free_at: float = 0.0  # when the frames already admitted are all serialized
    last_out: float = 0.0  # when the last admitted frame leaves (no frame may leave before it)
    lost: int = 0
    queue_drops: int = 0

    def configure(self, rate_mbit: float, link: LinkConfig, frame_bytes: int) -> None:
        self.rate_bps = rate_mbit * 1e6
        self.delay_s = link.delay_ms / 1000
        self.jitter_s = link.jitter_ms / 1000
        self.loss = link.loss
        self.queue_bytes = link.queue_limit_bytes(rate_mbit, frame_bytes)

    def admit(self, now: float, size_bytes: int) -> float | None:
        """When a frame that reaches this direction at ``now`` leaves it; None: lost or dropped at the queue."""
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return None
        start = max(now, self.free_at)
        backlog_bytes = (start - now) * self.rate_bps / 8
        if backlog_bytes > 0 and backlog_bytes + size_bytes > self.queue_bytes:
            self.queue_drops += 1
            return None
        self.free_at = start + size_bytes * 8 / self.rate_bps
        out = self.free_at + self.delay_s + (self.rng.random() * self.jitter_s if self.jitter_s else 0.0)
        out = max(out, self.last_out)
        self.last_out = out
        return out


@dataclass
class Port:
    """One host: its TAP fd, its two directions, and its byte counts (Ethernet frames, headers included)."""

    fd: int
    up: Direction
    down: Direction
    sent_bytes: int = 0
    sent_frames: int = 0
    received_bytes: int = 0
    received_frames: int = 0

    def stats(self) -> dict[str, int]:
        return {
            "sent_bytes": self.sent_bytes,
            "sent_frames": self.sent_frames,
            "received_bytes": self.received_bytes,
            "received_frames": self.received_frames,
            "lost": self.up.lost + self.down.lost,
            "queue_drops": self.up.queue_drops + self.down.queue_drops,
        }


# a pending frame: (when, sequence number, delivered to the host (else: reaches the switch), receiving host, frame)
_Event = tuple[float, int, bool, int, bytes]


class Switch:
    """The frame switch: reads every TAP, runs frames through the links, writes them out when due."""

    def __init__(self, fds: list[int], links: list[LinkConfig], mtu: int, seed: int) -> None:
        self.frame_bytes = mtu + ETH_HEADER_BYTES
        self.ports = [
            Port(fd=fd, up=Direction(random.Random(f"{seed}/{i}/up")), down=Direction(random.Random(f"{seed}/{i}/dn")))
            for i, fd in enumerate(fds)
        ]
        for i, link in enumerate(links):
            self.set_link(i, link)
        self.by_mac = {bytes.fromhex(host_mac(i).replace(":", "")): i for i in range(len(fds))}
        self.by_fd = {fd: i for i, fd in enumerate(fds)}
        self.events: list[_Event] = []
        self.seq = 0

    def set_link(self, host: int, link: LinkConfig) -> None:
        port = self.ports[host]
        port.up.configure(link.up_mbit, link, self.frame_bytes)
        port.down.configure(link.down_mbit, link, self.frame_bytes)

    def _push(self, at: float, deliver: bool, host: int, frame: bytes) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, deliver, host, frame))

    def read(self, fd: int, now: float) -> None:
        """Take the frames waiting on one TAP into the sender's uplink."""
        src = self.by_fd[fd]
        port = self.ports[src]
        for _ in range(READS_PER_WAKE):
            try:
                frame = os.read(fd, self.frame_bytes + 64)
            except BlockingIOError:
                return
            port.sent_bytes += len(frame)
            port.sent_frames += 1
            at = port.up.admit(now, len(frame))
            if at is None:
                continue
            dst = self.by_mac.get(frame[:6])
            if dst is not None:
                if dst != src:
                    self._push(at, False, dst, frame)
            elif frame[0] & 1:  # broadcast or multicast: every other host
                for other in range(len(self.ports)):
                    if other != src:
                        self._push(at, False, other, frame)

    def run_due(self, now: float) -> float | None:
        """Move every frame whose time has come; the seconds until the next one (None: nothing pending)."""
        events = self.events
        while events and events[0][0] <= now:
            at, _, deliver, host, frame = heapq.heappop(events)
            port = self.ports[host]
            if deliver:
                try:
                    os.write(port.fd, frame)
                except OSError:  # the device is going away or its queue is full: the frame is lost
                    continue
                port.received_bytes += len(frame)
                port.received_frames += 1
            else:
                out = port.down.admit(at, len(frame))
                if out is not None:
                    self._push(out, True, host, frame)
        return events[0][0] - now if events else None


def configure_devices(namespaces: list[str], subnet: str, mtu: int) -> None:
    """Address, MAC, MTU and static neighbours of every host's TAP device (open already)."""
    for i, ns in enumerate(namespaces):
        ip("-n", ns, "link", "set", TAP_NAME, "address", host_mac(i), "mtu", str(mtu), "up")
        ip("-n", ns, "addr", "add", f"{host_address(subnet, i)}/24", "dev", TAP_NAME)
        for j in range(len(namespaces)):
            if j != i:
                ip(
                    "-n", ns, "neigh", "replace", host_address(subnet, j),
                    "lladdr", host_mac(j), "dev", TAP_NAME, "nud", "permanent",
                )  # fmt: skip


def _answer(switch: Switch, line: str) -> dict[str, Any]:
    try:
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "link":
            switch.set_link(int(cmd["host"]), build(LinkConfig, cmd["link"]))
            return {"ok": True}
        if op == "stats":
            return {"ok": True, "hosts": [p.stats() for p in switch.ports]}
        if op == "stop":
            return {"ok": True, "stop": True}
        return {"ok": False, "error": f"unknown op {op!r}"}
    except (ValueError, KeyError, TypeError) as e:
        return {"ok": False, "error": str(e)}


def serve(spec: dict[str, Any]) -> None:
    """Open the TAPs, configure them, say ready, and switch frames until stdin closes or a stop command."""
    namespaces: list[str] = spec["namespaces"]
    mtu = int(spec["mtu"])
    with contextlib.suppress(OSError):  # ahead of the hosts' processes: its timing is every link's timing
        os.nice(EMULATOR_NICE)
    fds = [open_tap(ns) for ns in namespaces]
    configure_devices(namespaces, spec["subnet"], mtu)
    links = [build(LinkConfig, link) for link in spec["links"]]
    switch = Switch(fds, links, mtu, int(spec["seed"]))
    stdin = sys.stdin.fileno()
    watched = [*fds, stdin]
    pending = b""
    print(json.dumps({"ready": True}), flush=True)
    timeout: float | None = None
    while True:
        # select, not epoll: its timeout has microseconds (epoll's milliseconds would add up to 4 ms a round trip)
        readable, _, _ = select.select(watched, [], [], None if timeout is None else max(timeout, 0.0))
        for fd in readable:
            if fd != stdin:
                switch.read(fd, time.monotonic())
                continue
            chunk = os.read(stdin, 65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                reply = _answer(switch, line.decode())
                print(json.dumps(reply), flush=True)
                if reply.get("stop"):
                    return
        timeout = switch.run_due(time.monotonic())
