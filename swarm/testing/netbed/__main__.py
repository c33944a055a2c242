"""``python -m swarm.testing.netbed``: ``cleanup`` (a crashed bed's leftovers), ``list``, ``up`` (a bed until
Ctrl-C, for trying things by hand) and ``emulate`` (the emulator process a `Bed` starts; not for people)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from swarm.testing.netbed.bed import Bed, BedConfig
from swarm.testing.netbed.emulator import serve
from swarm.testing.netbed.namespaces import (
    NetbedError,
    list_namespaces,
    missing_requirements,
    remove_namespace,
    stale_namespaces,
)
from swarm.testing.netbed.profiles import PROFILES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.testing.netbed", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    clean = sub.add_parser("cleanup", help="remove the namespaces (and their processes) of beds whose owner is gone")
    clean.add_argument("--all", action="store_true", help="also those of beds still running")
    sub.add_parser("list", help="list the bed namespaces, live and stale")
    up = sub.add_parser("up", help="start a bed and keep it until Ctrl-C")
    up.add_argument("--hosts", type=int, default=4)
    up.add_argument("--profile", choices=tuple(PROFILES), default="wan")
    up.add_argument("--mtu", type=int, default=BedConfig().mtu)
    emulate = sub.add_parser("emulate", help="(internal) the emulator process of a bed")
    emulate.add_argument("spec", help="the bed's spec as JSON")
    args = parser.parse_args(argv)
    if args.cmd == "emulate":
        serve(json.loads(args.spec))
        return 0
    why = missing_requirements()
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    try:
        if args.cmd == "list":
            stale = set(stale_namespaces())
            for name in list_namespaces():
                print(name, "stale" if name in stale else "live")
        elif args.cmd == "cleanup":
            names = list_namespaces() if args.all else stale_namespaces()
            for name in names:
                remove_namespace(name)
                print("removed", name)
        else:
            logging.basicConfig(level=logging.INFO)
            with Bed(BedConfig(hosts=args.hosts, profile=args.profile, mtu=args.mtu)) as bed:
                for i, ns in enumerate(bed.namespaces):
                    print(f"host {i}: {bed.address(i)} in {ns} (ip netns exec {ns} ...)", flush=True)
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    except NetbedError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
