"""Network namespaces and TAP devices of the bed: create, enter, list, remove (Linux, root).

Every namespace the bed creates is called ``swwan-<pid>x<n>-<host>``: ``<pid>`` is the process that owns the bed,
so `stale_namespaces` can tell a crashed bed's leftovers (its owner is gone) from a live one. A TAP device is
opened from a short-lived thread that entered the host's namespace (``setns`` changes only the calling thread),
so it lives in that namespace while the emulator, in the root namespace, holds its file descriptor.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

from swarm.errors import SwarmError
import contextlib

PREFIX = "swwan-"
NETNS_DIR = Path("/run/netns")
TUN_PATH = "/dev/net/tun"
TAP_NAME = "swwan0"  # the TAP device inside each host's namespace
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
_NAME_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)x(\d+)-(\d+)$")


class NetbedError(SwarmError):
    """The test bed could not be set up or driven (not root, no ``ip``, no /dev/net/tun, a command failed)."""

    code = "netbed"


def missing_requirements() -> str | None:
    """Why the bed cannot run here (None: it can): it needs Linux, root, ``ip`` and /dev/net/tun."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the WAN test bed needs root (network namespaces and TAP devices)"
    if shutil.which("ip") is None:
        return "the WAN test bed needs the `ip` command (iproute2)"
    if not os.path.exists(TUN_PATH):
        return f"the WAN test bed needs {TUN_PATH}"
    return None


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; NetbedError with its stderr when it fails and ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetbedError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def namespace_name(owner_pid: int, bed_index: int, host: int) -> str:
    return f"{PREFIX}{owner_pid}x{bed_index}-{host}"


def list_namespaces() -> list[str]:
    """Every namespace the bed's prefix names, live or stale."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    return sorted(n for n in names if _NAME_RE.match(n))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_namespaces() -> list[str]:
    """The bed namespaces whose owner process is gone (a crashed bed's leftovers)."""
    stale = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match is not None and not _pid_alive(int(match.group(1))):
            stale.append(name)
    return stale


def create_namespace(name: str) -> None:
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    # no IPv6 (its neighbour discovery and MLD frames would be noise on the emulated links)
    sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")
    sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")


def sysctl(name: str, key: str, value: str) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    done = subprocess.run(
        ["ip", "netns", "exec", name, "sh", "-c", f"echo {value} > {path}"], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise NetbedError(f"cannot set {key}={value} in {name}: {done.stderr.strip()}")


def kill_namespace_processes(name: str, grace_s: float = 5.0) -> None:
    """SIGTERM every process inside namespace ``name``, then SIGKILL what is left after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        pids = [int(p) for p in ip("netns", "pids", name, check=False).split()]
        if not pids:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.1)


def remove_namespace(name: str) -> None:
    """Stop the processes inside ``name`` and delete it (with the devices in it)."""
    kill_namespace_processes(name)
    ip("netns", "del", name, check=False)


def enter_namespace(name: str) -> None:
    """Move the calling thread into namespace ``name`` (threads it starts later are born there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(NETNS_DIR / name, "rb") as ns:
        if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetbedError(f"cannot enter namespace {name}: {os.strerror(err)}")


def open_tap(namespace: str, ifname: str = TAP_NAME) -> int:
    """Create TAP device ``ifname`` inside ``namespace``; its non-blocking fd, held by the calling process."""
    result: list[int | BaseException] = []

    def inside() -> None:
        try:
            enter_namespace(namespace)
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
            except OSError:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=inside, name=f"tap-{namespace}")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise NetbedError(f"cannot open a TAP device in {namespace}: {result[0]}")
    return result[0]
