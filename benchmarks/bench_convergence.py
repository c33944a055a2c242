"""Convergence benchmark: a run trained by a single-process loop and by a 4-node local swarm, in the same run.

In the same run: the plain single-process PyTorch loop (same model, global batch, optimizer and data source)
trains for ``--steps`` steps; then `swarm-node local --nodes 4` trains the same run for the same steps, once with
no lossy codec and once with ``blockwise8`` activations. Prints both loss curves, the final-loss ratios (mean of
the last ``--tail`` steps, swarm / single), both throughputs in tokens/s (the swarm's measured from its first
microbatch to its last step, i.e. without process start-up), and writes a PNG plot of the curves.

    python benchmarks/bench_convergence.py [--steps 30] [--nodes 4] [--config NAME|FILE] [--set FIELD=VALUE]...
        [--out-dir DIR] [--skip-lossy]

When the run evaluates (``[eval] every_steps``, e.g. ``--config llama_stdlib``), both validation-loss curves are
reported, computed on the same held-out microbatches at the same steps, and their final ratio. Peak RSS is reported
per swarm node process and for the single-process loop.

Goals: the default run (issue #6): training-loss ratio <= 1.05 without lossy codecs, <= 1.10 with blockwise8
activations; swarm tokens/s >= 0.5x the single process. A compute-bound run that evaluates (issue #14,
``--config llama_stdlib``): final validation-loss ratio <= 1.03, swarm tokens/s >= 0.8x, on a 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from swarm.run.config import RunConfig
from swarm.training.local_train import train_local


def run_swarm(run: RunConfig, *, nodes: int, steps: int, work_dir: Path, label: str) -> dict[str, Any]:
    config_path = work_dir / f"{label}.toml"
    config_path.write_text(run.to_toml())
    if RunConfig.from_toml(config_path) != run:
        raise SystemExit("internal: the written TOML does not reproduce the run config")
    shutil.rmtree(work_dir / label, ignore_errors=True)  # an earlier run's checkpoints would resume at its end
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.cli.node",
            "local",
            "--nodes",
            str(nodes),
            "--steps",
            str(steps),
            "--json",
            "--config",
            str(config_path),
            "--run-dir",
            str(work_dir / label),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the {label} swarm failed (exit {proc.returncode}); logs in {work_dir / label}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["wall_s_with_startup"] = round(time.perf_counter() - started, 2)
    return summary


def tail_mean(curve: list[float], tail: int) -> float:
    return sum(curve[-tail:]) / len(curve[-tail:])


def plot(curves: dict[str, list[float]], floor: float | None, path: Path, title: str) -> bool:
    """Write the curves to ``path`` (PNG); False, with a note on stderr, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        ax.plot(range(len(curve)), curve, label=label)
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", label=f"loss floor {floor:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean training loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--tail", type=int, default=3, help="final loss = mean of the last TAIL steps")
    parser.add_argument("--config", default=None, help="a run file, or a shipped preset by name")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="run-config override FIELD=VALUE (repeatable), e.g. averaging.delayed_update=true: the swarm's run "
        "(the single-process loop has no averaging to change)",
    )
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--skip-lossy", action="store_true", help="skip the blockwise8-activations swarm")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each node process does
    run = RunConfig.load(args.config, args.set)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-convergence-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    _, single = train_local(run, steps=args.steps)
    single_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    swarm = run_swarm(run, nodes=args.nodes, steps=args.steps, work_dir=out_dir, label="swarm-none")
    curves = {"single process": single.losses, f"{args.nodes}-node swarm": swarm["loss_curve"]}
    result: dict[str, Any] = {
        "benchmark": "convergence",
        "run_id": run.run_id,
        "steps": args.steps,
        "loss_floor": single.loss_floor,
        "single": {
            "loss_curve": [round(x, 4) for x in single.losses],
            "final_loss": round(tail_mean(single.losses, args.tail), 4),
            "samples": single.samples,
            "tokens_per_s": round(single.tokens_per_s, 1),
            "elapsed_s": round(single.elapsed_s, 2),
        },
        "swarm": {
            k: swarm[k] for k in ("loss_curve", "samples", "tokens_per_s", "elapsed_s", "wall_s_with_startup", "stages")
        }
        | {"final_loss": round(tail_mean(swarm["loss_curve"], args.tail), 4)},
    }
    result["final_loss_ratio"] = round(result["swarm"]["final_loss"] / result["single"]["final_loss"], 4)
    result["tokens_per_s_ratio"] = round(swarm["tokens_per_s"] / single.tokens_per_s, 4)
    result["single"]["peak_rss_bytes"] = single_rss_bytes
    result["swarm"]["peak_rss_bytes_per_node"] = swarm.get("peak_rss_bytes")
    if single.eval_losses:
        result["single"]["eval_curve"] = [[k, round(v, 4)] for k, v in sorted(single.eval_losses.items())]
        result["swarm"]["eval_curve"] = swarm.get("eval_curve")
        if swarm.get("final_eval_loss") is not None:
            final_single = single.eval_losses[max(single.eval_losses)]
            result["final_eval_loss_ratio"] = round(swarm["final_eval_loss"] / final_single, 4)
    if not args.skip_lossy:
        lossy_run = dataclasses.replace(run, codecs=dataclasses.replace(run.codecs, activations="blockwise8"))
        lossy = run_swarm(lossy_run, nodes=args.nodes, steps=args.steps, work_dir=out_dir, label="swarm-blockwise8")
        curves[f"{args.nodes}-node swarm, blockwise8 activations"] = lossy["loss_curve"]
        result["swarm_blockwise8"] = {k: lossy[k] for k in ("loss_curve", "samples", "tokens_per_s", "elapsed_s")} | {
            "final_loss": round(tail_mean(lossy["loss_curve"], args.tail), 4)
        }
        result["final_loss_ratio_blockwise8"] = round(
            result["swarm_blockwise8"]["final_loss"] / result["single"]["final_loss"], 4
        )
    plot_path = out_dir / "convergence.png"
    result["plot"] = (
        str(plot_path)
        if plot(curves, single.loss_floor, plot_path, f"{run.name}: single process vs {args.nodes}-node swarm")
        else None
    )
    if "final_eval_loss_ratio" in result:  # a compute-bound run that evaluates (issue #14)
        result["goals"] = {
            "final_eval_loss_ratio<=1.03": result["final_eval_loss_ratio"] <= 1.03,
            "tokens_per_s_ratio>=0.8": result["tokens_per_s_ratio"] >= 0.8,
        }
    else:
        result["goals"] = {
            "final_loss_ratio<=1.05": result["final_loss_ratio"] <= 1.05,
            "final_loss_ratio_blockwise8<=1.10": result.get("final_loss_ratio_blockwise8", 99) <= 1.10,
            "tokens_per_s_ratio>=0.5": result["tokens_per_s_ratio"] >= 0.5,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
