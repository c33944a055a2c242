"""A NAT test bed of Linux network namespaces: public hosts on one segment, homes behind masquerading routers.

    public segment 10.88.0.0/16 (a bridge in namespace <prefix>sw)
      <prefix>p1 10.88.0.11, <prefix>p2 10.88.0.12 ...            public hosts
      <prefix>ra wan 10.88.0.101 | lan 192.168.1.1 -> <prefix>ha 192.168.1.2   home A
      <prefix>rb wan 10.88.0.102 | lan 192.168.2.1 -> <prefix>hb 192.168.2.2   home B

Each router masquerades what leaves its ``wan`` (nftables ``masquerade``) and drops new connections coming in
on it, like a home router without port forwarding (``forward_port`` adds one). Every link and address lives
inside the bed's namespaces (the root namespace's routes and firewall are never touched), so removing the
namespaces removes everything: ``NatBed.destroy`` removes exactly the namespaces it created (also on SIGTERM
and at exit), and ``python -m swarm.testing.natbed cleanup`` removes every ``swnat-`` namespace a crashed run
left behind. ``unavailable_reason()`` says why the bed cannot run here (not root, no ``ip``/``nft``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

PREFIX = "swnat-"


@dataclass(frozen=True)
class Host:
    """A namespace that runs programs: ``ip`` is its address (public, or private behind ``router``)."""

    name: str
    ip: str
    router: str | None = None  # the router namespace of a home host
    wan_ip: str | None = None  # the address its traffic is masqueraded to


def unavailable_reason() -> str | None:
    """Why the bed cannot be built here (None if it can): it needs root, ``ip`` and ``nft``."""
    if os.geteuid() != 0:
        return "the NAT bed needs root (network namespaces and nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the NAT bed needs `{tool}` (install iproute2 / nftables)"
    return None


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_all(prefix: str = PREFIX) -> list[str]:
    """Remove every namespace whose name starts with ``prefix`` (``swnat-``: every bed's, after a crash; a bed's
    own prefix is ``swnat-<tag>-``); the names removed."""
    if not prefix.startswith(PREFIX):
        raise ValueError(f"prefix must start with {PREFIX!r}: only the beds' namespaces are removed")
    removed = []
    for name in _namespaces():
        if name.startswith(prefix):
            subprocess.run(["ip", "netns", "pids", name], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            removed.append(name)
    return removed


class NatBed:
    """The bed (see the module docstring): ``with NatBed(public=2, homes=2) as bed: bed.popen(bed.home(0), ...)``."""

    def __init__(self, *, public: int = 2, homes: int = 2, tag: str | None = None) -> None:
        if not 1 <= public <= 50 or not 0 <= homes <= 20:
            raise ValueError("public must be in 1..50 and homes in 0..20")
        self.prefix = f"{PREFIX}{tag or os.getpid() % 100000}-"
        self.public_hosts = [Host(f"{self.prefix}p{i + 1}", f"10.88.0.{11 + i}") for i in range(public)]
        self.homes = [
            Host(
                f"{self.prefix}h{i + 1}",
                f"192.168.{i + 1}.2",
                router=f"{self.prefix}r{i + 1}",
                wan_ip=f"10.88.0.{101 + i}",
            )
            for i in range(homes)
        ]
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self._old_sigterm: Any = None

    def __enter__(self) -> NatBed:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def create(self) -> None:
        """Build the namespaces, links, addresses and NAT rules (destroying what was built if a step fails)."""
        atexit.register(self.destroy)
        self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _build(self) -> None:
        sw = f"{self.prefix}sw"
        self._ns(sw)
        _run("ip", "-n", sw, "link", "add", "name", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for i, host in enumerate(self.public_hosts):
            self._ns(host.name)
            self._plug(sw, f"p{i + 1}", host.name, "eth0", f"{host.ip}/16")
        for i, home in enumerate(self.homes):
            router = home.router or ""
            self._ns(router)
            self._ns(home.name)
            self._plug(sw, f"r{i + 1}", router, "wan", f"{home.wan_ip}/16")
            _run(
                "ip",
                "-n",
                router,
                "link",
                "add",
                "name",
                "lan",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                home.name,
            )
            _run("ip", "-n", router, "addr", "add", f"192.168.{i + 1}.1/24", "dev", "lan")
            _run("ip", "-n", router, "link", "set", "lan", "up")
            _run("ip", "-n", home.name, "addr", "add", f"{home.ip}/24", "dev", "eth0")
            _run("ip", "-n", home.name, "link", "set", "eth0", "up")
            _run("ip", "-n", home.name, "route", "add", "default", "via", f"192.168.{i + 1}.1")
            _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            nft(router, router_rules("wan"))

    def _plug(self, sw: str, sw_end: str, ns: str, ns_end: str, cidr: str) -> None:
        """A veth from the bridge namespace ``sw`` (end ``sw_end``, on br0) into ``ns`` (end ``ns_end``, ``cidr``)."""
        _run("ip", "-n", sw, "link", "add", "name", sw_end, "type", "veth", "peer", "name", ns_end, "netns", ns)
        _run("ip", "-n", sw, "link", "set", sw_end, "master", "br0")
        _run("ip", "-n", sw, "link", "set", sw_end, "up")
        _run("ip", "-n", ns, "addr", "add", cidr, "dev", ns_end)
        _run("ip", "-n", ns, "link", "set", ns_end, "up")

    def forward_port(self, home: Host, port: int) -> None:
        """Port forwarding on ``home``'s router: ``wan_ip:port`` -> ``home.ip:port``."""
        forward_port(home, port, "wan")

    def command(self, host: Host, args: Sequence[str]) -> list[str]:
        """``args`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", host.name, *args]

    def popen(self, host: Host, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` in ``host``'s namespace; `destroy` stops it if the caller has not."""
        proc = subprocess.Popen(self.command(host, args), **kwargs)
        self.procs.append(proc)
        return proc

    def destroy(self) -> None:
        """Stop the processes started here, then remove exactly the namespaces created (idempotent)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        self.procs.clear()
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created.clear()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        atexit.unregister(self.destroy)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        old = self._old_sigterm
        self.destroy()
        if callable(old):
            old(signum, frame)
        else:
            raise SystemExit(128 + signum)


def nft(ns: str, rules: str) -> None:
    """Load nftables ``rules`` in namespace ``ns``."""
    result = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise RuntimeError(f"nft in {ns} failed: {result.stderr.strip()}")


def router_rules(wan: str) -> str:
    """A home router's rules: masquerade what leaves its uplink ``wan``; drop new connections that come in on it
    unless port forwarding (`forward_port`) sent them on."""
    return (
        "table ip swnat {\n"
        " chain post { type nat hook postrouting priority srcnat; policy accept;\n"
        f'  oifname "{wan}" masquerade\n }}\n'
        " chain inbound { type filter hook forward priority 0; policy accept;\n"
        f'  iifname "{wan}" ct state new ct status dnat accept\n'
        f'  iifname "{wan}" ct state new drop\n }}\n'
        "}\n"
    )


def forward_port(home: Host, port: int, wan: str) -> None:
    """Port forwarding on ``home``'s router (uplink ``wan``): ``wan_ip:port`` -> ``home.ip:port``."""
    if home.router is None:
        raise ValueError(f"{home.name} is not behind a router")
    nft(
        home.router,
        "table ip swnat {\n chain pre { type nat hook prerouting priority dstnat; policy accept;\n"
        f'  iifname "{wan}" tcp dport {port} dnat to {home.ip}:{port}\n }}\n}}\n',
    )


def main(argv: list[str]) -> int:
    if argv[1:] == ["cleanup"]:
        removed = cleanup_all()
        print(f"removed {len(removed)} namespaces: {' '.join(removed)}" if removed else "nothing to remove")
        return 0
    print("usage: python -m swarm.testing.natbed cleanup   (remove every swnat- namespace left behind)")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
