"""WAN benchmark: one swarm node per emulated internet host (swarm.testing.netbed, docs/netbed.md) trains a run
for ``--steps`` steps under each link profile.

Per profile: ``s_per_step`` (from the first microbatch to the last step, without start-up), ``tokens_per_s``,
``ratio_to_lan`` (its s_per_step over lan's), ``bytes_per_step_per_host`` (Ethernet bytes a host sent, counted
on its TAP device by the emulator, from the moment every node serves to the end, per step, mean over hosts) and
``final_loss`` (mean of the last ``--tail`` steps), and ``steady_s_per_step`` (from the end of step 1 to the end
of the last step, as the stage servers report them: the first steps' connection and group set-up excluded). From
two runs that differ only in delay (lan's rates at the one-way delays ``--slope-delays-ms``) it derives
``rtts_per_step``: the slope of the steady step time over round-trip time, i.e. how many round trips a
running step waits for (``rtts_per_step_overall``: the same from ``s_per_step``, set-up included).
``--faults`` adds two runs under ``wan``: the last host's link drops
every frame for ``--blip-s`` seconds mid-run (the swarm must route around it and take it back without a
restart), and the last host loses 2% of its frames each way all run. ``--repeat N`` runs every scenario N times,
interleaved, and reports the run of median step time (on a busy machine, step times vary from run to run).

    sudo python benchmarks/bench_wan.py [--config tiny_gpt] [--profiles lan,wan,home,far] [--steps 10] [--faults]
        [--slope-delays-ms 0.5,100] [--repeat 1] [--hosts 4] [--out-dir DIR]

Needs root, `ip` and /dev/net/tun (the bed's namespaces and TAP devices). Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedswarm import BedRun, HostNode, read_summaries, run_on_bed, swarm_figures

from swarm.data import bind_data
from swarm.run.config import RunConfig
from swarm.testing.netbed import PROFILES, Bed, BedConfig, Profile, missing_requirements


@dataclass
class Scenario:
    """One swarm run: a profile for every host, and optionally a fault on the last host."""

    label: str
    profile: Profile
    blip_s: float = 0.0  # the last host's link drops everything for this long, mid-run
    lossy: float = 0.0  # the last host's link loses this share of frames each way, all run
    notes: dict[str, Any] = field(default_factory=dict)


async def _observe(bed: Bed, nodes: list[HostNode], run_id: str, lines: list[dict[str, Any]]) -> None:
    """Read the run's progress records once a second from inside host 0 (`observe` below) into ``lines``."""
    argv = [sys.executable, __file__, "observe", "--peer", nodes[0].maddr, "--run-id", run_id]
    proc = await asyncio.create_subprocess_exec(*bed.command(0, argv), stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            lines.append(json.loads(line))
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def _blip(bed: Bed, sc: Scenario, lines: list[dict[str, Any]], steps: int) -> None:
    """Once the run is a third of the way, drop every frame of the last host for ``sc.blip_s`` seconds."""
    host = bed.cfg.hosts - 1
    while not lines or max(lines[-1]["steps"].values(), default=0) < max(steps // 3, 1):
        await asyncio.sleep(0.2)
    sc.notes["blip_start"] = time.time()
    sc.notes["steps_at_blip_start"] = lines[-1]["steps"]
    bed.set_link(host, sc.profile.link(loss=1.0))
    await asyncio.sleep(sc.blip_s)
    bed.set_link(host, sc.profile.link())
    sc.notes["blip_end"] = time.time()
    sc.notes["steps_at_blip_end"] = lines[-1]["steps"]


async def _run_swarm(
    args: argparse.Namespace, bed: Bed, sc: Scenario, run_id: str, name: str
) -> tuple[list[HostNode], dict]:
    bed.set_profile(sc.profile)
    if sc.lossy:
        bed.set_link(bed.cfg.hosts - 1, sc.profile.link(loss=sc.lossy))
    lines: list[dict[str, Any]] = []

    def during(nodes: list[HostNode]) -> list[Coroutine[Any, Any, None]]:
        if not sc.blip_s:
            return []
        return [_observe(bed, nodes, run_id, lines), _blip(bed, sc, lines, args.steps)]

    run = BedRun(
        config_spec=args.config_spec,
        steps=args.steps,
        hosts=args.hosts,
        sets=tuple(args.set),
        start_timeout_s=args.start_timeout,
        timeout_s=args.timeout,
    )
    nodes, traffic = await run_on_bed(run, bed, args.out_dir / name, sc.label, during)
    if sc.blip_s:
        sc.notes["progress"] = lines
    return nodes, traffic


def _summarize(args: argparse.Namespace, run: RunConfig, sc: Scenario, nodes: list[HostNode], traffic: dict) -> dict:
    figures = swarm_figures(run, read_summaries(nodes, sc.label), args.steps, len(nodes))
    steps, curve, elapsed = figures["steps"], figures["loss_curve"], figures["elapsed_s"]
    tail = curve[-args.tail :]
    return {
        "profile": sc.profile.name,
        "rtt_ms": sc.profile.rtt_ms,
        "ok": figures["ok"],
        "exit_codes": [n.proc.returncode for n in nodes],
        "steps": steps,
        "s_per_step": round(elapsed / steps, 4) if steps else None,
        "steady_s_per_step": figures["steady_s_per_step"],
        "tokens_per_s": figures["tokens_per_s"],
        "bytes_per_step_per_host": round(sum(traffic["sent_bytes"]) / len(nodes) / steps) if steps else None,
        "frames_lost": sum(traffic["lost"]),
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "loss_curve": curve,
        "elapsed_s": elapsed,
        **sc.notes,
    }


def _blip_findings(result: dict[str, Any]) -> dict[str, Any]:
    """From the progress lines: did the others step during the blip, how long did the swarm stall, did the
    blipped host finish (it rejoined without a restart)?"""
    start, end = result.get("blip_start"), result.get("blip_end")
    lines = result.pop("progress", [])
    if start is None or end is None:
        return {"blip_happened": False}
    during = [ln for ln in lines if start <= ln["t"] <= end]
    others_advanced = 0
    if during:
        first, last = during[0]["steps"], during[-1]["steps"]
        others_advanced = max((last[p] - first.get(p, 0) for p in last), default=0)
    stall_s, top, since = 0.0, -1, None  # the longest time the newest step of the swarm did not change
    for ln in lines:
        newest = max(ln["steps"].values(), default=-1)
        if newest > top:
            top, since = newest, ln["t"]
        elif since is not None and 0 < top < result["steps"]:
            stall_s = max(stall_s, ln["t"] - since)
    return {
        "blip_happened": True,
        "max_steps_advanced_during_blip": others_advanced,
        "longest_stall_s": round(stall_s, 1),
        "all_nodes_finished": result["ok"],
        "progress_samples": len(lines),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median step time (every run's step time beside it); a failed run counts as the slowest."""
    ordered = sorted(runs, key=lambda r: r["s_per_step"] if r["ok"] and r["s_per_step"] else float("inf"))
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["s_per_step_runs"] = [r["s_per_step"] for r in runs]
    median["ok"] = all(r["ok"] for r in runs)
    return median


async def _bench(args: argparse.Namespace, run: RunConfig) -> dict[str, Any]:
    scenarios = [Scenario(label=name, profile=PROFILES[name]) for name in args.profiles]
    delays = [d for d in args.slope_delays_ms if not any(abs(d - s.profile.one_way_ms) < 1e-9 and s.profile.up_mbit
                                                         == PROFILES["lan"].up_mbit for s in scenarios)]  # fmt: skip
    lan = PROFILES["lan"]
    for d in delays:
        p = Profile(name=f"lan_rate_{d:g}ms", one_way_ms=d, up_mbit=lan.up_mbit, down_mbit=lan.down_mbit)
        scenarios.append(Scenario(label=p.name, profile=p))
    if args.faults:
        wan = PROFILES["wan"]
        scenarios.append(Scenario(label="wan_blip", profile=wan, blip_s=args.blip_s))
        scenarios.append(Scenario(label="wan_lossy_2pct", profile=wan, lossy=0.02))
    runs: dict[str, list[dict[str, Any]]] = {sc.label: [] for sc in scenarios}
    with Bed(BedConfig(hosts=args.hosts, mtu=args.mtu, seed=args.seed)) as bed:
        for rep in range(args.repeat):  # interleaved: a load change on the machine hits every scenario alike
            for sc in scenarios:
                print(
                    f"running {sc.label} #{rep} ({args.hosts} hosts, {args.steps} steps)", file=sys.stderr, flush=True
                )
                sc.notes.clear()
                nodes, traffic = await _run_swarm(args, bed, sc, run.run_id, f"{sc.label}-{rep}")
                result = _summarize(args, run, sc, nodes, traffic)
                if sc.blip_s:
                    result.update(_blip_findings(result))
                runs[sc.label].append(result)
                shown = {k: v for k, v in result.items() if k != "loss_curve"}
                print(f"{sc.label} #{rep}: {json.dumps(shown)}", file=sys.stderr, flush=True)
    results = {label: _median_run(rs) for label, rs in runs.items()}
    lan_s = results.get("lan", {}).get("s_per_step")
    for r in results.values():
        r["ratio_to_lan"] = round(r["s_per_step"] / lan_s, 3) if lan_s and r["s_per_step"] else None
    slope, by_delay = _slope(results, "steady_s_per_step")
    slope_overall, by_delay_overall = _slope(results, "s_per_step")
    return {
        "benchmark": "wan",
        "config": args.config_spec,
        "run_id": run.run_id,
        "hosts": args.hosts,
        "steps": args.steps,
        "mtu": args.mtu,
        "rtts_per_step": slope,
        "rtts_per_step_from": [{"rtt_ms": r, "steady_s_per_step": s} for r, s in by_delay],
        "rtts_per_step_overall": slope_overall,
        "rtts_per_step_overall_from": [{"rtt_ms": r, "s_per_step": s} for r, s in by_delay_overall],
        "profiles": results,
        "ok": all(r["ok"] for r in results.values()),
    }


def _slope(results: dict[str, dict[str, Any]], key: str) -> tuple[float | None, list[tuple[float, float]]]:
    """Round trips per step: the slope of ``key`` (seconds per step) over the round-trip time, from the runs at lan's
    rates (lowest and highest delay); with the (rtt_ms, seconds) points it came from."""
    by_delay = sorted(
        (r["rtt_ms"], r[key])
        for label, r in results.items()
        if r.get(key) and (label == "lan" or label.startswith("lan_rate_"))
    )
    if len(by_delay) < 2 or by_delay[-1][0] <= by_delay[0][0]:
        return None, by_delay
    (r0, s0), (r1, s1) = by_delay[0], by_delay[-1]
    return round((s1 - s0) / ((r1 - r0) / 1000), 2), by_delay


async def observe(peer: str, run_id: str, interval_s: float) -> None:
    """Print every driver's step (the run's progress records) as one JSON line each ``interval_s``."""
    from swarm.dht import DHT, DHTConfig
    from swarm.dht.keys import progress_key
    from swarm.training.schemas import with_run_schemas
    from swarm.training.view import SwarmView

    cfg = DHTConfig(initial_peers=(peer,), client_mode=True, rpc_timeout_s=2.0, lookup_timeout_s=4.0,
                    maintenance_interval_s=3600.0)  # fmt: skip
    async with DHT.create(with_run_schemas(cfg)) as dht:
        while True:
            try:
                async with asyncio.timeout(interval_s * 3):
                    view = SwarmView.parse(None, await dht.get(progress_key(run_id), latest=True))
                steps = {p.short(): r.step for p, r in view.progress.items()}
                print(json.dumps({"t": time.time(), "steps": steps}), flush=True)
            except (TimeoutError, OSError):
                pass
            await asyncio.sleep(interval_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    obs = sub.add_parser("observe", help="(internal) print the run's progress from inside a host")
    obs.add_argument("--peer", required=True)
    obs.add_argument("--run-id", required=True)
    obs.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--config", default="tiny_gpt", help="run config: a shipped preset name or a TOML file")
    parser.add_argument("--set", action="append", default=[], help="run-config override FIELD=VALUE (repeatable)")
    parser.add_argument("--profiles", default="lan,wan,home,far", help=f"comma-separated, of {', '.join(PROFILES)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario, interleaved; the median counts")
    parser.add_argument("--tail", type=int, default=3, help="final loss = mean of the last TAIL steps")
    parser.add_argument("--slope-delays-ms", default="0.5,100", help="one-way delays (ms) at lan's rates for the slope")
    parser.add_argument("--faults", action="store_true", help="also a 10 s blackout and a 2%%-loss host, under wan")
    parser.add_argument("--blip-s", type=float, default=10.0)
    parser.add_argument("--mtu", type=int, default=BedConfig().mtu)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline of one swarm run (s)")
    parser.add_argument("--start-timeout", type=float, default=120.0, help="deadline of one node's start (s)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.cmd == "observe":
        asyncio.run(observe(args.peer, args.run_id, args.interval))
        return
    why = missing_requirements()
    if why is not None:
        raise SystemExit(why)
    args.profiles = [p for p in args.profiles.split(",") if p]
    unknown = [p for p in args.profiles if p not in PROFILES]
    if unknown:
        raise SystemExit(f"unknown profiles {unknown}; known: {', '.join(PROFILES)}")
    args.slope_delays_ms = [float(d) for d in args.slope_delays_ms.split(",") if d]
    path = Path(args.config)
    args.config_spec = str(path.resolve()) if path.exists() else args.config
    run = bind_data(RunConfig.load(args.config_spec, args.set))
    args.out_dir = (args.out_dir or Path(tempfile.mkdtemp(prefix="bench-wan-"))).resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(_bench(args, run))
    result["out_dir"] = str(args.out_dir)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
