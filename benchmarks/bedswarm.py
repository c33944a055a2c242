"""A swarm on the WAN test bed: one ``swarm-node start`` per emulated host (swarm.testing.netbed, docs/netbed.md),
shared by the benchmarks that train on it (bench_wan.py, bench_traffic.py ``--profile``).

`run_on_bed` starts one node per host (node 0 first: everyone's initial peer; each after the previous one serves),
waits until every node reached ``steps`` and exited, stops what is left, and returns the nodes and the Ethernet bytes
each host sent and the frames it lost meanwhile (counted by the emulator, from the moment every node serves).
`read_summaries` reads the nodes' summary files; `swarm_figures` turns them into the same figures (loss curve,
tokens/s, elapsed) ``swarm-node local --json`` reports.

Benchmarks import it as a sibling module (they run as ``python benchmarks/NAME.py``, so benchmarks/ is on the path).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.local.events import EventReader, ListeningEvent, NodeEventError, ServingEvent
from swarm.run.config import RunConfig
from swarm.testing.netbed import Bed
from swarm.training.summary import NodeSummary, SummaryError

STOP_GRACE_S = 10.0


@dataclass
class HostNode:
    host: int
    proc: subprocess.Popen[bytes]
    folder: Path
    maddr: str = ""


@dataclass(frozen=True)
class BedRun:
    """What one swarm on the bed runs: the run config (a preset name or a TOML path) with ``sets`` on top, for
    ``steps`` steps on ``hosts`` hosts, with deadlines for one node's start and for the whole run (s)."""

    config_spec: str
    steps: int
    hosts: int
    sets: Sequence[str] = ()
    start_timeout_s: float = 120.0
    timeout_s: float = 900.0
    extra_argv: Sequence[str] = field(default_factory=tuple)


def node_argv(run: BedRun, bed: Bed, host: int, folder: Path, bootstrap: str | None) -> list[str]:
    """The ``swarm-node start`` command line of the node on ``host``."""
    argv = [
        sys.executable, "-m", "swarm.cli.node", "start",
        "--listen", f"/ip4/{bed.address(host)}/tcp/0",
        "--data-dir", str(folder),
        "--max-steps", str(run.steps),
        "--summary-file", str(folder / "summary.json"),
        "--events-file", str(folder / "events.jsonl"),
        "--start-after-peers", str(run.hosts),
        "--device", "cpu",
        "--config", run.config_spec,
    ]  # fmt: skip
    for override in run.sets:
        argv += ["--set", override]
    argv += list(run.extra_argv)
    if bootstrap is not None:
        argv += ["--initial-peers", bootstrap]
    return argv


async def start_nodes(run: BedRun, bed: Bed, run_dir: Path, nodes: list[HostNode]) -> None:
    """One node per host into ``nodes``, each after the previous one serves (node 0 is everyone's initial peer)."""
    for host in range(run.hosts):
        folder = run_dir / f"node-{host}"
        folder.mkdir(parents=True)
        argv = node_argv(run, bed, host, folder, nodes[0].maddr if nodes else None)
        with open(run_dir / f"node-{host}.log", "ab") as log_file:
            proc = bed.popen(host, argv, stdout=log_file, stderr=log_file, start_new_session=True)
        node = HostNode(host=host, proc=proc, folder=folder)
        nodes.append(node)
        events = EventReader(folder / "events.jsonl")
        alive = lambda p=proc: p.poll() is None  # noqa: E731
        try:
            async with asyncio.timeout(run.start_timeout_s):
                node.maddr = (await events.wait_for(ListeningEvent, alive=alive)).maddrs[0]
                await events.wait_for(ServingEvent, alive=alive)
        except (NodeEventError, TimeoutError) as e:
            raise SystemExit(f"node {host} did not start ({e!r}); see {run_dir}/node-{host}.log") from None


def stop_nodes(nodes: Sequence[HostNode]) -> None:
    """SIGTERM to every node still running, SIGKILL to those that outlive ``STOP_GRACE_S``."""
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.terminate()
    for node in nodes:
        try:
            node.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


async def run_on_bed(
    run: BedRun,
    bed: Bed,
    run_dir: Path,
    label: str,
    during: Callable[[list[HostNode]], Sequence[Awaitable[None]]] | None = None,
) -> tuple[list[HostNode], dict[str, list[int]]]:
    """Start the swarm of ``run`` on ``bed`` (one node per host, logs and node folders under ``run_dir``), wait for
    every node to finish, stop them. ``during`` gives coroutines to run while the swarm trains (cancelled at its
    end). Returns the nodes and, per host, the Ethernet bytes it sent and the frames it lost while all served."""
    run_dir.mkdir(parents=True)
    nodes: list[HostNode] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        await start_nodes(run, bed, run_dir, nodes)
        before = bed.stats()
        tasks = [asyncio.ensure_future(c) for c in (during(nodes) if during else ())]
        async with asyncio.timeout(run.timeout_s):
            while any(n.proc.poll() is None for n in nodes):
                await asyncio.sleep(0.5)
        after = bed.stats()
    except TimeoutError:
        raise SystemExit(f"{label}: the swarm did not finish within {run.timeout_s}s; logs in {run_dir}") from None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_nodes(nodes)
    sent = [a["sent_bytes"] - b["sent_bytes"] for a, b in zip(after, before, strict=True)]
    lost = [a["lost"] - b["lost"] for a, b in zip(after, before, strict=True)]
    return nodes, {"sent_bytes": sent, "lost": lost}


def read_summaries(nodes: Sequence[HostNode], label: str) -> list[NodeSummary]:
    """The nodes' summary files; a missing or bad one is reported on stderr and left out."""
    summaries: list[NodeSummary] = []
    for node in nodes:
        try:
            summaries.append(NodeSummary.read(node.folder / "summary.json"))
        except SummaryError as e:
            print(f"{label}: node {node.host}: {e}", file=sys.stderr)
    return summaries


STEADY_WARMUP_STEPS = 2  # steps 0 and 1 pay the connections' and the first group's set-up


def _steady_s_per_step(summaries: Sequence[NodeSummary], *, warmup_steps: int) -> float | None:
    """Seconds per step once the swarm runs: the swarm finished step k when its last stage server did; the time
    from the end of step ``warmup_steps - 1`` to the end of the last step, per step (None: too few steps)."""
    done: dict[int, float] = {}
    for s in summaries:
        for step, t in s.step_times.items():
            done[step] = max(done.get(step, t), t)
    first, last = warmup_steps - 1, max(done, default=-1)
    if first not in done or last <= first:
        return None
    return (done[last] - done[first]) / (last - first)


def swarm_figures(run: RunConfig, summaries: Sequence[NodeSummary], steps: int, nodes: int) -> dict[str, Any]:
    """From the nodes' summaries, as ``swarm-node local --json`` reports them: ``ok`` (every node wrote a summary
    and reached ``steps``), ``steps``, ``loss_curve`` (mean loss per step over the drivers), ``initial_loss``,
    ``tokens_per_s`` and ``elapsed_s`` (from the first microbatch to the last node's end, without start-up),
    ``steady_s_per_step`` (from the end of step 1 to the end of the last step: the first steps' connection and group
    set-up excluded),
    ``final_eval_loss`` (the held-out loss of the last evaluation, None without one)."""
    per_step: dict[int, list[float]] = {}
    for s in summaries:
        for step, losses in s.losses.items():
            per_step.setdefault(step, []).extend(losses)
    curve = [sum(per_step[k]) / len(per_step[k]) for k in sorted(per_step)]
    reached = min((s.step for s in summaries), default=0)
    starts = [s.first_sample_time for s in summaries if s.first_sample_time]
    ends = [s.end_time for s in summaries if s.end_time]
    elapsed = max(ends) - min(starts) if starts and ends else 0.0
    samples = sum(s.samples for s in summaries)
    steady = _steady_s_per_step(summaries, warmup_steps=STEADY_WARMUP_STEPS)
    evals = {step: loss for s in summaries for step, loss in s.eval_losses.items()}  # one evaluator per step
    return {
        "ok": len(summaries) == nodes and reached >= steps,
        "steps": reached,
        "loss_curve": [round(x, 4) for x in curve],
        "initial_loss": round(curve[0], 4) if curve else None,
        "tokens_per_s": round(samples * run.model.seq_len / elapsed, 1) if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 2),
        "steady_s_per_step": round(steady, 4) if steady is not None else None,
        "final_eval_loss": round(evals[max(evals)], 4) if evals else None,
    }
