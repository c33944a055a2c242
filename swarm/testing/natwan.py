"""The NAT bed on the WAN bed's emulated links: public hosts and home routers whose uplinks are access links of
the netbed emulator (docs/netbed.md), so that a swarm with volunteers behind NAT pays a profile's round trips and
line rates (``wan``: 25 ms one way, 100 Mbit/s).

    public host i     netbed host i: 10.77.0.<i+1> on its TAP ``swwan0``, one emulated access link
    home j's router   netbed host P+j: its ``swwan0`` (10.77.0.<P+j+1>) is the router's uplink, the home's link
    home j            namespace ``swnat-w<pid>x<n>-h<j+1>``, 192.168.<j+1>.2 on a veth behind the router, which
                      masquerades what leaves ``swwan0`` and drops new connections coming in on it (`natbed`)

A frame between a home and a public host crosses the router's access link and the public host's: the profile's
path, as between two public hosts. A relayed exchange between two homes crosses two such paths. The veths carry
the bed's MTU, so the emulator switches as few frames for a home as for a public host.

`NatWanBed` removes exactly what it created (the processes it started, its home namespaces, then the netbed
`Bed` with its namespaces and emulator) on `destroy`, on leaving the ``with`` block, at interpreter exit and on
SIGTERM (the netbed `Bed` raises it as SystemExit in the main thread). After a SIGKILL of its owner,
``python -m swarm.testing.natwan cleanup`` removes the leftovers whose owner is gone (``--all``: every one).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from swarm.testing.natbed import PREFIX as NAT_PREFIX
from swarm.testing.natbed import Host, forward_port, nft, router_rules
from swarm.testing.natbed import unavailable_reason as nat_unavailable
from swarm.testing.netbed.bed import Bed, BedConfig, stop_processes
from swarm.testing.netbed.namespaces import (
    TAP_NAME,
    create_namespace,
    ip,
    list_namespaces,
    missing_requirements,
    remove_namespace,
    stale_namespaces,
    sysctl,
)

HOME_PREFIX = f"{NAT_PREFIX}w"  # swnat-w<owner pid>x<n>-h<j>
_HOME_RE = re.compile(rf"^{re.escape(HOME_PREFIX)}(\d+)x(\d+)-h\d+$")
_beds = itertools.count()


def unavailable_reason() -> str | None:
    """Why this bed cannot run here (None if it can): root, ``ip``, ``nft`` and /dev/net/tun."""
    return nat_unavailable() or missing_requirements()


class NatWanBed:
    """``with NatWanBed(public=2, homes=2, profile="wan") as bed: bed.popen(bed.homes[0], [...])``; ``bed.net`` is
    the netbed `Bed` (``set_link``, ``stats``; a home's link is its router's host, ``len(public_hosts) + j``)."""

    def __init__(self, *, public: int = 2, homes: int = 2, profile: str = "wan", seed: int = 0) -> None:
        if not 1 <= public <= 32 or not 0 <= homes <= 16 or public + homes < 2:
            raise ValueError("public must be in 1..32, homes in 0..16, and the hosts at least 2")
        self.net = Bed(BedConfig(hosts=public + homes, profile=profile, seed=seed))
        self.public_hosts = [Host(self.net.namespaces[i], self.net.address(i)) for i in range(public)]
        number = next(_beds)
        self.homes = [
            Host(
                f"{HOME_PREFIX}{os.getpid()}x{number}-h{j + 1}",
                f"192.168.{j + 1}.2",
                router=self.net.namespaces[public + j],
                wan_ip=self.net.address(public + j),
            )
            for j in range(homes)
        ]
        self.created: list[str] = []  # home namespaces (the netbed `Bed` owns the rest)
        self.procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NatWanBed:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        """Start the emulated hosts, then build each home behind its router (undoing everything if a step fails)."""
        self.net.start()  # registers its own stop at exit, and SIGTERM -> SystemExit
        atexit.register(self.destroy)  # runs before the bed's stop (atexit is last in, first out)
        try:
            for j, home in enumerate(self.homes):
                self._build_home(j, home)
        except BaseException:
            self.destroy()
            raise

    def _build_home(self, j: int, home: Host) -> None:
        router, mtu = home.router or "", str(self.net.cfg.mtu)
        create_namespace(home.name)
        self.created.append(home.name)
        ip("-n", router, "link", "add", "name", "lan", "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu,
           "netns", home.name)  # fmt: skip
        ip("-n", router, "addr", "add", f"192.168.{j + 1}.1/24", "dev", "lan")
        ip("-n", router, "link", "set", "lan", "up")
        ip("-n", home.name, "addr", "add", f"{home.ip}/24", "dev", "eth0")
        ip("-n", home.name, "link", "set", "eth0", "up")
        ip("-n", home.name, "route", "add", "default", "via", f"192.168.{j + 1}.1")
        sysctl(router, "net.ipv4.ip_forward", "1")
        nft(router, router_rules(TAP_NAME))

    def forward_port(self, home: Host, port: int) -> None:
        """Port forwarding on ``home``'s router: ``wan_ip:port`` -> ``home.ip:port``."""
        forward_port(home, port, TAP_NAME)

    def command(self, host: Host, args: Sequence[str]) -> list[str]:
        """``args`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", host.name, *args]

    def popen(self, host: Host, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` in ``host``'s namespace; `destroy` stops it if the caller has not."""
        proc = subprocess.Popen(self.command(host, args), **kwargs)
        self.procs = [p for p in self.procs if p.poll() is None] + [proc]
        return proc

    def destroy(self) -> None:
        """SIGTERM what `popen` started (SIGKILL after a grace period), remove the home namespaces, stop the netbed
        `Bed` (its namespaces and emulator). Idempotent."""
        stop_processes(self.procs)
        self.procs.clear()
        for name in reversed(self.created):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                remove_namespace(name)
        self.created.clear()
        self.net.stop()
        atexit.unregister(self.destroy)


def _owner_alive(name: str) -> bool:
    match = _HOME_RE.match(name)
    if match is None:
        return True
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(*, every: bool = False) -> list[str]:
    """Remove the home namespaces and netbed namespaces whose owner process is gone (``every``: all of them, live
    beds' too); the names removed."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    homes = [n for n in (line.split()[0] for line in out.splitlines() if line.strip()) if _HOME_RE.match(n)]
    names = [n for n in homes if every or not _owner_alive(n)]
    names += list_namespaces() if every else stale_namespaces()
    for name in names:
        remove_namespace(name)
    return names


def main(argv: list[str]) -> int:
    if argv[1:2] == ["cleanup"] and argv[2:] in ([], ["--all"]):
        removed = cleanup(every=argv[2:] == ["--all"])
        print(f"removed {len(removed)} namespaces: {' '.join(removed)}" if removed else "nothing to remove")
        return 0
    print("usage: python -m swarm.testing.natwan cleanup [--all]   (the namespaces of beds whose owner is gone)")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
