"""Robustness benchmark: a local swarm of processes with 2 of 8 nodes sending gradients x(-1000).

In the same run, `swarm-node local --nodes 8 --validators 1` trains the `tiny_gpt_robust` preset
(CenteredClip in the all-reduce) three times for ``--steps`` steps: all honest; with ``--misbehave sign-flip:2``;
and with ``sign-flip:2`` under a plain mean (the same config with ``averaging.reduction = "mean"``), the
unprotected baseline. Prints each final loss (mean of the last ``--tail`` steps), the ratios to the honest run,
and whether exactly the cheaters were flagged.

    python benchmarks/bench_robustness.py [--steps 30] [--nodes 8] [--out-dir DIR]

Goal (issue #7): with CenteredClip, final loss within 5% of the honest run (ratio <= 1.05), and the cheaters
flagged and nobody else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from swarm.run.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def run_swarm(config: Path, *, nodes: int, steps: int, cheats: list[str], run_dir: Path) -> dict[str, Any]:
    args = [
        sys.executable,
        "-m",
        "swarm.cli.node",
        "local",
        "--nodes",
        str(nodes),
        "--validators",
        "1",
        "--steps",
        str(steps),
        "--json",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--timeout",
        "1200",
    ]
    for cheat in cheats:
        args += ["--misbehave", cheat]
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's checkpoints would resume at its end
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1500, cwd=REPO)
    summary = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    if not summary.get("ok"):
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the swarm in {run_dir} failed (exit {proc.returncode})")
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--tail", type=int, default=5, help="final loss = mean of the last TAIL steps")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-robustness-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    robust = REPO / "swarm" / "run" / "presets" / "tiny_gpt_robust.toml"
    run = RunConfig.from_toml(robust)
    mean_config = out_dir / "mean.toml"
    mean_config.write_text(
        dataclasses.replace(run, averaging=dataclasses.replace(run.averaging, reduction="mean")).to_toml()
    )

    cases = {
        "honest": (robust, []),
        "sign_flip_centered_clip": (robust, ["sign-flip:2"]),
        "sign_flip_mean": (mean_config, ["sign-flip:2"]),
    }
    result: dict[str, Any] = {
        "benchmark": "robustness",
        "nodes": args.nodes,
        "steps": args.steps,
        "clip_tau": run.averaging.clip_tau,
    }
    for label, (config, cheats) in cases.items():
        summary = run_swarm(config, nodes=args.nodes, steps=args.steps, cheats=cheats, run_dir=out_dir / label)
        curve = summary["loss_curve"]
        result[label] = {
            "final_loss": round(sum(curve[-args.tail :]) / len(curve[-args.tail :]), 4),
            "loss_curve": curve,
            "flagged_exactly_the_cheaters": summary["flagged"] == summary["misbehaving"],
            "num_flagged": len(summary["flagged"]),
            "attestations": summary["attestations"],
            "elapsed_s": summary["elapsed_s"],
            "wall_s": summary["wall_s"],
        }
    honest = result["honest"]["final_loss"]
    result["final_loss_ratio_centered_clip"] = round(result["sign_flip_centered_clip"]["final_loss"] / honest, 4)
    result["final_loss_ratio_mean"] = round(result["sign_flip_mean"]["final_loss"] / honest, 4)
    result["goals"] = {
        "final_loss_ratio_centered_clip<=1.05": result["final_loss_ratio_centered_clip"] <= 1.05,
        "cheaters_flagged_exactly": result["sign_flip_centered_clip"]["flagged_exactly_the_cheaters"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
