"""Traffic benchmark: bytes per step through the network, counted by the transports, for each way of cutting them.

One run (the compute-bound model: ``--blocks`` blocks of width ``--width`` on real text, the ``gpt_stdlib`` preset's
data; or any ``--config``), trained for ``--steps`` steps by a ``--nodes``-node local swarm (``swarm-node local``),
once per mode, on the same tokens (same seed, same data, and on loopback the same node keys: `pin_identities`);
with ``--profile lan|wan|home|far``, on the WAN test bed instead (swarm.testing.netbed, docs/netbed.md: one
``swarm-node start`` per emulated host, every host's link of that profile; needs root, `ip` and /dev/net/tun), which
is where ``tokens_per_s`` means something:

- ``every_step``: the reference, every-step fp32 all-reduce of the gradients, uncompressed activations;
- ``bottleneck``: a learned activation bottleneck of ``--ratio`` between stages
  (``pipeline.activation_bottleneck_ratio``), with ``--activation-codec`` on top (``codecs.activations`` and
  ``codecs.activation_grads``);
- ``local_sgd``: inner steps without an all-reduce, an outer sync every ``--inner-steps`` steps
  (``[averaging] mode = "local_sgd"``; ``--inner-steps``, ``--outer-lr``, ``--outer-momentum``,
  ``--outer-topk-fraction``, ``--outer-bits`` default to the run config's: 34 inner steps, plain averaging),
  compressed by ``--outer-codec`` (``codecs.allreduce``, default blockwise8) and ``--outer-compression``
  (``averaging.outer_compression``: none, or topk_q, which pays only in long runs: docs/averaging.md);
- ``both``: the two together.

Every figure comes from the nodes' run summaries (``swarm-node local --json``, or the nodes' summary files on the bed;
`traffic`: the bytes each node's transport counted per RPC family and method, summed over the nodes, per step; on the
bed also the Ethernet bytes each host sent per step, as the emulator counted them). Data-parallel bytes are the
``avg.*`` family; activation bytes are ``stage.forward`` + ``stage.backward`` (activations and their gradients);
the tied embedding/head exchange (``stage.tied``) is reported on its own. A mode the tree does not have yet (its
run-config keys are unknown: a ConfigError) is reported as unavailable, with the reason, and the others still run.

    python benchmarks/bench_traffic.py [--steps 100] [--nodes 4] [--blocks 8] [--width 256] [--ratio 16]
        [--activation-codec blockwise8] [--inner-steps N] [--outer-lr X] [--outer-momentum X]
        [--outer-compression none] [--outer-topk-fraction X] [--outer-bits N] [--outer-codec blockwise8]
        [--modes every_step,bottleneck,local_sgd,both] [--profile loopback|lan|wan|home|far] [--tail 10]
        [--eval-batches 8] [--reference EARLIER.json] [--out-dir DIR]

Last line: one JSON object with, per mode, ``dp_bytes_ratio`` and ``activation_bytes_ratio`` (reference bytes /
mode bytes; ``dp_tied_bytes_ratio`` counts the tied exchange as data-parallel too), ``final_loss_ratio`` (mode /
reference, mean of the last ``--tail`` steps), with ``--eval-batches`` ``final_eval_loss_ratio`` (the held-out loss
at the end: in local_sgd of the synced weights), ``tokens_per_s`` and ``tokens_per_s_ratio`` (mode / reference).
Goals (issue 16): dp_bytes_ratio >= 100, activation_bytes_ratio >= 32, final_loss_ratio <= 1.03 (local steps) and
<= 1.05 (with the bottleneck), tokens/s >= 3x the reference under the ``home`` profile (on loopback the figure says
little: loopback bytes are nearly free). ``--reference`` takes the every_step run of an earlier result of the same
run instead of training it again (to compare settings of a mode).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bedswarm import BedRun, read_summaries, run_on_bed, swarm_figures

from swarm.errors import ConfigError
from swarm.local.launcher import traffic_summary
from swarm.node import IDENTITY_FILE_NAME
from swarm.p2p.identity import Identity
from swarm.run.config import RunConfig
from swarm.testing.netbed import PROFILES as BED_PROFILES
from swarm.testing.netbed import Bed, BedConfig, missing_requirements

MODES = ("every_step", "bottleneck", "local_sgd", "both")
ACTIVATION_METHODS = ("stage.forward", "stage.backward")
PROFILES = ("loopback", *BED_PROFILES)


def mode_overrides(mode: str, args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides of ``mode`` on top of the reference run."""
    bottleneck = [
        f"pipeline.activation_bottleneck_ratio={args.ratio}",
        f"codecs.activations={json.dumps(args.activation_codec)}",
        f"codecs.activation_grads={json.dumps(args.activation_codec)}",
    ]
    local_sgd = [
        'averaging.mode="local_sgd"',
        f"averaging.outer_compression={json.dumps(args.outer_compression)}",
        f"codecs.allreduce={json.dumps(args.outer_codec)}",
    ]
    # unset: the run config's defaults (what a user gets)
    for key in ("inner_steps", "outer_lr", "outer_momentum", "outer_topk_fraction", "outer_bits"):
        if getattr(args, key) is not None:
            local_sgd.append(f"averaging.{key}={getattr(args, key)}")
    return {"every_step": [], "bottleneck": bottleneck, "local_sgd": local_sgd, "both": bottleneck + local_sgd}[mode]


def base_overrides(args: argparse.Namespace) -> list[str]:
    """The reference run: the preset (or ``--config``), at the benchmark's size."""
    return [
        f"model.d_model={args.width}",
        f"model.num_blocks={args.blocks}",
        f"model.num_heads={args.heads}",
        f"model.seq_len={args.seq_len}",
        f"batch.target_batch_size={args.batch}",
        f"batch.microbatch_size={args.microbatch}",
        f"eval.every_steps={args.steps if args.eval_batches else 0}",  # at step 0 and at the end: synced weights
        f"eval.batches={args.eval_batches or 1}",
    ]


def check_profile(profile: str) -> None:
    """Loopback needs nothing; a WAN test bed profile needs root, `ip` and /dev/net/tun (docs/netbed.md)."""
    if profile == "loopback":
        return
    why = missing_requirements()
    if why is not None:
        raise SystemExit(f"--profile {profile} runs on the WAN test bed: {why}")


def pin_identities(run_dir: Path, nodes: int) -> None:
    """Give node ``i`` of every run the same key (so the same peer id): a driver's data windows are keyed by its peer
    id, so with fresh random keys two runs of one config train on different tokens and their losses differ by
    several percent; pinned, every mode (and a later ``--reference`` run) reads the same windows."""
    for index in range(nodes):
        seed = hashlib.sha256(f"bench_traffic node {index}".encode()).digest()
        Identity.from_seed(seed).save(run_dir / f"node-{index}" / IDENTITY_FILE_NAME)


def identities(args: argparse.Namespace) -> str:
    """How the nodes got their keys: ``pinned`` on loopback (`pin_identities`), ``random`` on the WAN test bed."""
    return "pinned" if args.profile == "loopback" else "random"


def run_swarm(config: Path, sets: list[str], args: argparse.Namespace, label: str) -> dict[str, Any]:
    """One ``swarm-node local --json`` run; its summary, with the wall time including start-up."""
    run_dir = args.out_dir / label
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's checkpoints would resume at its end
    pin_identities(run_dir, args.nodes)
    argv = [sys.executable, "-m", "swarm.cli.node", "local", "--nodes", str(args.nodes), "--steps", str(args.steps)]
    argv += ["--json", "--config", str(config), "--run-dir", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout_s, env={**os.environ})
    if proc.returncode != 0 or not proc.stdout.strip():
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the {label} swarm failed (exit {proc.returncode}); logs in {run_dir}")
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["wall_s_with_startup"] = round(time.perf_counter() - started, 2)
    return summary


def run_swarms_on_bed(
    config: Path, runs: dict[str, list[str]], args: argparse.Namespace, run: RunConfig
) -> dict[str, dict[str, Any]]:
    """Each mode's swarm on the WAN test bed, one after the other on one bed: one node per emulated host, every
    host's link of ``args.profile``; per mode the summary ``run_swarm`` gives, from the nodes' summary files, plus
    the Ethernet bytes each host sent per step as the emulator counted them."""

    async def all_modes() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with Bed(BedConfig(hosts=args.nodes)) as bed:
            bed.set_profile(BED_PROFILES[args.profile])
            for label, sets in runs.items():
                run_dir = args.out_dir / label
                shutil.rmtree(run_dir, ignore_errors=True)
                spec = BedRun(config_spec=str(config), steps=args.steps, hosts=args.nodes, sets=tuple(sets),
                              timeout_s=args.timeout_s)  # fmt: skip
                print(f"{label}: training {args.steps} steps on {args.nodes} {args.profile} hosts ...", file=sys.stderr,
                      flush=True)  # fmt: skip
                started = time.perf_counter()
                nodes, wire = await run_on_bed(spec, bed, run_dir, label)
                summaries = read_summaries(nodes, label)
                summary = swarm_figures(run, summaries, args.steps, len(nodes))
                steps = max(summary["steps"], 1)
                summary["traffic"] = traffic_summary(summaries)
                summary["wall_s_with_startup"] = round(time.perf_counter() - started, 2)
                summary["bed_sent_bytes_per_step_per_host"] = [round(b / steps) for b in wire["sent_bytes"]]
                summary["bed_frames_lost"] = sum(wire["lost"])
                out[label] = summary
        return out

    return asyncio.run(all_modes())


def figures(summary: dict[str, Any], tail: int) -> dict[str, Any]:
    """The bytes per step (all nodes' sent bytes) and the losses of one run."""
    traffic = summary["traffic"]
    methods = traffic["method_sent_bytes_per_step"]
    curve = summary["loss_curve"]
    return {
        "dp_bytes_per_step": round(traffic["sent_bytes_per_step"].get("avg", 0.0), 1),
        "activation_bytes_per_step": round(sum(methods.get(m, 0.0) for m in ACTIVATION_METHODS), 1),
        "tied_bytes_per_step": round(methods.get("stage.tied", 0.0), 1),
        "total_bytes_per_step": round(sum(traffic["sent_bytes_per_step"].values()), 1),
        "sent_bytes_per_step": traffic["sent_bytes_per_step"],
        "method_sent_bytes_per_step": methods,
        "final_loss": round(sum(curve[-tail:]) / len(curve[-tail:]), 4) if curve else None,
        "final_eval_loss": summary.get("final_eval_loss"),
        "initial_loss": summary["initial_loss"],
        "loss_curve": curve,
        "tokens_per_s": summary["tokens_per_s"],
        "bed_sent_bytes_per_step_per_host": summary.get("bed_sent_bytes_per_step_per_host"),
        "elapsed_s": summary["elapsed_s"],
        "wall_s_with_startup": summary["wall_s_with_startup"],
        "ok": summary.get("ok"),
    }


def load_reference(path: Path, run_id: str, args: argparse.Namespace) -> dict[str, Any]:
    """The every_step run of an earlier result (``--reference``), refused unless it trained the same run (run id,
    steps, profile, nodes) and summed its final loss over the same tail."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")]  # a saved stdout+stderr too
    if not lines:
        raise SystemExit(f"--reference {path}: no JSON line")
    earlier: dict[str, Any] = json.loads(lines[-1])
    same = {
        "run_id": (earlier.get("run_id"), run_id),
        "steps": (earlier.get("steps"), args.steps),
        "profile": (earlier.get("profile"), args.profile),
        "nodes": (earlier.get("model", {}).get("nodes"), args.nodes),
        "tail": (earlier.get("settings", {}).get("tail"), args.tail),
        "identities": (earlier.get("settings", {}).get("identities"), identities(args)),
    }
    differ = {k: v for k, v in same.items() if v[0] != v[1]}
    if differ or not earlier.get("modes", {}).get("every_step", {}).get("available"):
        raise SystemExit(f"--reference {path}: not this run's every_step reference ({differ or 'no every_step run'})")
    reference: dict[str, Any] = earlier["modes"]["every_step"]
    reference["from"] = str(path)
    return reference


def ratio(reference: float | None, value: float | None) -> float | None:
    """``reference / value``; None when a side is missing or sent nothing (one replica per stage: no all-reduce)."""
    if not reference or not value:
        return None
    return round(reference / value, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="steps per mode (the goals are judged at 100)")
    parser.add_argument("--nodes", type=int, default=4, help="nodes of the swarm (2 stages: 2 replicas each at 4)")
    parser.add_argument("--config", default=None, help="a run file or preset instead of gpt_stdlib (resized alike)")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="samples per step, swarm-wide")
    parser.add_argument("--microbatch", type=int, default=16)
    parser.add_argument("--ratio", type=int, default=16, help="the bottleneck's width / features on the wire")
    parser.add_argument("--activation-codec", default="blockwise8", help="codec on top of the bottleneck (none, ...)")
    parser.add_argument(
        "--inner-steps", type=int, default=None, help="local_sgd: steps between outer syncs (default: the run's)"
    )
    parser.add_argument("--outer-lr", type=float, default=None, help="local_sgd: outer lr (default: the run's)")
    parser.add_argument(
        "--outer-momentum", type=float, default=None, help="local_sgd: outer momentum (default: the run's)"
    )
    parser.add_argument(
        "--outer-topk-fraction", type=float, default=None, help="topk_q: share of entries sent (default: the run's)"
    )
    parser.add_argument("--outer-bits", type=int, default=None, help="topk_q: bits per sent value (default: the run's)")
    parser.add_argument(
        "--outer-compression", default="none", help="local_sgd: averaging.outer_compression (none, topk_q)"
    )
    parser.add_argument("--outer-codec", default="blockwise8", help="local_sgd: codecs.allreduce of the outer sync")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    parser.add_argument("--profile", default="loopback", choices=PROFILES)
    parser.add_argument("--tail", type=int, default=10, help="final loss = mean of the last TAIL steps")
    parser.add_argument(
        "--eval-batches", type=int, default=8, help="held-out loss at the end over this many microbatches (0: none)"
    )
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per swarm run")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="an earlier run's last-line JSON whose every_step run is the reference (same run id, steps, profile)",
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes) or ("every_step" not in modes and args.reference is None):
        raise SystemExit(f"--modes must name modes of {MODES}, every_step (the reference) among them")
    check_profile(args.profile)
    args.out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-traffic-"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = RunConfig.load(args.config or "gpt_stdlib", base_overrides(args))
    config = args.out_dir / "run.toml"
    config.write_text(base.to_toml())

    runs: dict[str, dict[str, Any]] = {}
    to_run: dict[str, list[str]] = {}
    for mode in modes:
        sets = mode_overrides(mode, args)
        try:
            RunConfig.load(config, sets)  # a mode this tree lacks is a config error: reported, not run
        except ConfigError as e:
            runs[mode] = {"available": False, "reason": str(e), "overrides": sets}
            print(f"{mode}: unavailable ({e})", file=sys.stderr, flush=True)
            continue
        to_run[mode] = sets
    if args.profile == "loopback":
        for mode, sets in to_run.items():
            print(f"{mode}: training {args.steps} steps on {args.nodes} nodes ...", file=sys.stderr, flush=True)
            runs[mode] = {
                "available": True,
                "overrides": sets,
                **figures(run_swarm(config, sets, args, mode), args.tail),
            }
    else:
        for mode, summary in run_swarms_on_bed(config, to_run, args, base).items():
            runs[mode] = {"available": True, "overrides": to_run[mode], **figures(summary, args.tail)}

    if "every_step" not in runs:
        runs["every_step"] = load_reference(args.reference, base.run_id, args)
    reference = runs["every_step"]
    result: dict[str, Any] = {
        "benchmark": "traffic",
        "profile": args.profile,
        "run_id": base.run_id,
        "model": {"blocks": args.blocks, "width": args.width, "data": base.data.source, "nodes": args.nodes},
        "steps": args.steps,
        "dp_bytes_ratio": {},
        "dp_tied_bytes_ratio": {},
        "activation_bytes_ratio": {},
        "final_loss_ratio": {},
        "final_eval_loss_ratio": {},
        "tokens_per_s": {},
        "tokens_per_s_ratio": {},
        "settings": {
            "inner_steps": args.inner_steps or base.averaging.inner_steps,
            "outer_lr": args.outer_lr or base.averaging.outer_lr,
            "outer_momentum": base.averaging.outer_momentum if args.outer_momentum is None else args.outer_momentum,
            "outer_codec": args.outer_codec,
            "outer_compression": args.outer_compression,
            "outer_topk_fraction": args.outer_topk_fraction or base.averaging.outer_topk_fraction,
            "outer_bits": args.outer_bits or base.averaging.outer_bits,
            "bottleneck_ratio": args.ratio,
            "activation_codec": args.activation_codec,
            "tail": args.tail,
            "identities": identities(args),
        },
        "unavailable": {m: r["reason"] for m, r in runs.items() if not r["available"]},
        "modes": runs,
    }
    for mode, r in runs.items():
        if not r["available"]:
            continue
        result["dp_bytes_ratio"][mode] = ratio(reference["dp_bytes_per_step"], r["dp_bytes_per_step"])
        result["dp_tied_bytes_ratio"][mode] = ratio(
            reference["dp_bytes_per_step"] + reference["tied_bytes_per_step"],
            r["dp_bytes_per_step"] + r["tied_bytes_per_step"],
        )
        result["activation_bytes_ratio"][mode] = ratio(
            reference["activation_bytes_per_step"], r["activation_bytes_per_step"]
        )
        loss_ratio = ratio(r["final_loss"], reference["final_loss"])
        result["final_loss_ratio"][mode] = loss_ratio
        if args.eval_batches:
            result["final_eval_loss_ratio"][mode] = ratio(r["final_eval_loss"], reference["final_eval_loss"])
        result["tokens_per_s"][mode] = r["tokens_per_s"]
        result["tokens_per_s_ratio"][mode] = ratio(r["tokens_per_s"], reference["tokens_per_s"])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
