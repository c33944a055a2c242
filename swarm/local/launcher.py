"""`swarm-node local`: a swarm of N node processes on loopback, a live view, and a JSON summary.

The first process is the bootstrap peer; the others get ``--initial-peers`` with its multiaddr. Each node is
started after the previous one reports the stage it serves (so self-assignment sees the earlier records) and
drives no microbatch until all N are in the run's records. Node 0 serves the status page, /metrics and /health
(``--http``, `LaunchConfig.http`); its URL is printed and is the summary's ``dashboard_url``. A node reports through
its events file
(``--events-file``, `swarm.local.events`), never through its output. Logs go to ``runs/<timestamp>/node-<i>.log``;
checkpoints, events and the node's `NodeSummary` (read at the end) to ``runs/<timestamp>/node-<i>/``. A client-mode
DHT node reads the run's records for the live view (`swarm.local.live_view`, on stderr: in place on a terminal,
plain lines elsewhere; stdout gets only the final line or the ``--json`` summary). Every process is stopped on
exit, on error and on Ctrl-C (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm.dht import DHT, DHTConfig
from swarm.run.config import RunConfig
from swarm.data import bind_data, make_source
from swarm.configs import Config, setting
from swarm.errors import ConfigError, SwarmError
from swarm.dht.keys import peers_key, progress_key
from swarm.model.devices import DEVICE_CHOICES, check_precision, resolve_device
from swarm.observe.config import parse_http_address
from swarm.local.events import EventReader, HttpEvent, ListeningEvent, NodeEventError, ServingEvent
from swarm.testing.misbehave import misbehave_args
from swarm.training.node_role import Role
from swarm.training.schemas import with_run_schemas
from swarm.training.summary import NodeSummary, SummaryError
from swarm.training.verifying import rewards_summary
from swarm.training.view import SwarmView
from swarm.local.live_view import LiveView
from swarm.local.run_view import RunViewModel, snapshot_of, step_samples_per_s

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
SUMMARY_FILE_NAME = "summary.json"  # in each node's folder: its NodeSummary
EVENTS_FILE_NAME = "events.jsonl"  # in each node's folder: its events (swarm.local.events)
CHEATER_GRACE_S = 20.0  # after every honest node exited, how long misbehaving (--misbehave) nodes may still run


class LaunchConfig(Config, section="local"):
    """How many nodes, which run, how long; where the run directory goes."""

    num_nodes: int = setting(default=4, ge=1, le=64, doc="Training node processes to start.")
    config_path: Path | None = setting(default=None, doc="Run config file or preset name (None: tiny_gpt).")
    overrides: tuple[str, ...] = setting(default=(), doc="Run-config overrides FIELD=VALUE, passed to every node.")
    steps: int = setting(default=30, ge=1, le=1_000_000, doc="Optimizer steps to train.")
    as_json: bool = setting(default=False, doc="Print a JSON summary as the last line of stdout.")
    run_dir: Path | None = setting(default=None, doc="Where logs, checkpoints and summaries go (runs/<timestamp>).")
    timeout_s: float = setting(default=1800.0, gt=0, le=86400, doc="Give up after this many seconds.")
    start_timeout_s: float = setting(default=120.0, gt=0, le=86400, doc="Deadline of one node's start.")
    table_interval_s: float = setting(default=2.0, gt=0, le=86400, doc="Seconds between refreshes of the live view.")
    extra_node_args: tuple[str, ...] = setting(default=(), doc="More arguments for every node's command line.")
    num_validators: int = setting(default=0, ge=0, le=16, doc="Validator processes to start besides the nodes.")
    misbehave: tuple[tuple[str, int], ...] = setting(
        default=(), doc="(kind, count) pairs: the last training nodes cheat on purpose."
    )
    device: str = setting(
        default="auto", choices=DEVICE_CHOICES, doc="Every node's --device (auto: CUDA, then MPS, then CPU)."
    )
    http: str | None = setting(
        default="127.0.0.1:0", doc="Node 0's --http HOST:PORT (the status page; port 0: any free one); None: off."
    )

    def validate(self) -> None:
        cheaters = sum(count for _, count in self.misbehave)
        if cheaters > self.num_nodes:
            raise ConfigError(f"local.misbehave: {cheaters} cheaters but only {self.num_nodes} nodes")
        if self.http is not None:
            parse_http_address(self.http)  # a bad --http fails here, not in node 0's log


@dataclass
class NodeProcess:
    """One started node: its process, its folder, and what it reported."""

    index: int
    proc: asyncio.subprocess.Process
    folder: Path
    maddr: str | None = None
    stage: int | None = None  # the stage it serves (None: none, or not reported yet)
    events: EventReader | None = None
    misbehaving: bool = False
    dashboard_url: str | None = None  # its status page (--http), shown in the live view when known

    @property
    def serving(self) -> str:
        """What it serves, for people."""
        return f"serving stage {self.stage if self.stage is not None else 'none (trainer)'}"


def launch(cfg: LaunchConfig) -> int:
    """Run the local swarm to completion; show the live view and print the result (with ``as_json``, the JSON
    summary). Returns an exit code."""
    # fail early on a bad config or missing data, before any process starts; a stdlib run's shards are built here
    run = bind_data(RunConfig.load(cfg.config_path, cfg.overrides), progress=not cfg.as_json)
    check_precision(resolve_device(cfg.device), run.precision.compute)
    run_dir = cfg.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        summary = asyncio.run(_launch(cfg, run, run_dir.resolve()))
    except KeyboardInterrupt:
        print("interrupted; every node process was stopped", file=sys.stderr)
        return 130
    if cfg.as_json:
        print(json.dumps(summary), flush=True)
    else:
        rate = step_samples_per_s(summary["steps"], run.batch.target_batch_size, summary["elapsed_s"]) or 0.0
        print(
            f"done: {summary['steps']} steps, loss {summary['initial_loss']} -> {summary['final_loss']} "
            f"(floor {summary['loss_floor']}), {rate:.1f} samples/s; logs in {run_dir}"
            + (
                f"; validation loss {summary['initial_eval_loss']} -> {summary['final_eval_loss']}"
                if summary["eval_curve"]
                else ""
            )
        )
    return 0 if summary.get("ok") else 1


async def _launch(cfg: LaunchConfig, run: RunConfig, run_dir: Path) -> dict[str, Any]:
    nodes: list[NodeProcess] = []
    model = RunViewModel(
        total_steps=cfg.steps, batch_size=run.batch.target_batch_size, num_stages=run.pipeline.num_stages
    )
    view = LiveView(model, stream=sys.stderr)  # stdout keeps the final line (or the --json summary)
    error: str | None = None
    try:
        try:
            async with asyncio.timeout(cfg.timeout_s):
                await _start_all(cfg, run_dir, nodes, view)
                model.dashboard_url = nodes[0].dashboard_url if nodes else None
                view.start()
                await _watch(cfg, run, nodes, view)
        except TimeoutError:
            view.stop()
            stuck = [n.index for n in nodes if n.proc.returncode is None]
            error = (
                f"the run did not finish within --timeout {cfg.timeout_s:.0f}s; nodes still running: {stuck}; "
                f"see their logs in {run_dir}"
            )
            print(error, file=sys.stderr, flush=True)
            for index in stuck:
                _print_log_tail(run_dir / f"node-{index}.log", index)
        finally:
            await _stop_all(nodes)
        summary = _summarize(cfg, run, run_dir, nodes)
        if error is not None:
            summary["ok"] = False
            summary["error"] = error
        model.finish(summary)
        view.finish()
    finally:
        view.stop()
    return summary


async def _start_all(cfg: LaunchConfig, run_dir: Path, nodes: list[NodeProcess], view: LiveView) -> None:
    """Start the training nodes one after the other (node 0 first, the bootstrap peer), then the validators."""
    cheats = misbehave_args(cfg.num_nodes, cfg.misbehave)
    for i in range(cfg.num_nodes):
        node = await _start_after_bootstrap(cfg, run_dir, i, nodes, cheats.get(i, ()))
        node.misbehaving = i in cheats
        nodes.append(node)
        view.note(f"node {i}: {node.maddr} {node.serving}")
        if node.dashboard_url is not None:
            view.note(f"dashboard: {node.dashboard_url} (/metrics, /health beside it)")
    for i in range(cfg.num_nodes, cfg.num_nodes + cfg.num_validators):
        node = await _start_node(cfg, run_dir, i, nodes[0].maddr, ("--role", Role.VALIDATOR))
        nodes.append(node)
        view.note(f"node {i}: {node.maddr} validator")


def _print_log_tail(path: Path, index: int, num_lines: int = 40) -> None:
    """Copy the last lines of a node's log to stderr, so a stuck run can be diagnosed from its output alone."""
    try:
        lines = path.read_text(errors="replace").splitlines()[-num_lines:]
    except OSError as e:
        print(f"node {index}: no log ({e})", file=sys.stderr)
        return
    print(f"--- last {len(lines)} lines of node-{index}.log ---", file=sys.stderr)
    for line in lines:
        print(f"node {index}| {line}", file=sys.stderr)
    sys.stderr.flush()


async def _start_after_bootstrap(
    cfg: LaunchConfig, run_dir: Path, index: int, nodes: list[NodeProcess], role_args: tuple[str, ...]
) -> NodeProcess:
    """Start node ``index`` with node 0 as its initial peer; if it fails because node 0 is gone, say so."""
    try:
        return await _start_node(cfg, run_dir, index, nodes[0].maddr if nodes else None, role_args)
    except SwarmError as e:
        if not nodes or nodes[0].proc.returncode is None:
            raise
        raise SwarmError(
            f"{e}: node 0, its initial peer, had already exited (code {nodes[0].proc.returncode}). If {run_dir} "
            f"holds checkpoints of an earlier run at --steps {cfg.steps}, node 0 resumed there and stopped at "
            "once: use a new --run-dir or more --steps"
        ) from None


async def _start_node(
    cfg: LaunchConfig, run_dir: Path, index: int, bootstrap: str | None, role_args: tuple[str, ...] = ()
) -> NodeProcess:
    folder = run_dir / f"node-{index}"
    folder.mkdir(parents=True, exist_ok=True)
    events_path = folder / EVENTS_FILE_NAME
    events_path.unlink(missing_ok=True)  # an earlier run's events must not be read as this node's
    args = [
        sys.executable,
        "-m",
        "swarm.cli.node",
        "start",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--data-dir",
        str(folder),
        "--max-steps",
        str(cfg.steps),
        "--summary-file",
        str(folder / SUMMARY_FILE_NAME),
        "--events-file",
        str(events_path),
        "--start-after-peers",
        str(cfg.num_nodes + cfg.num_validators),
        "--device",
        cfg.device,
        *cfg.extra_node_args,
        *role_args,
    ]
    if index == 0 and cfg.http is not None:
        args += ["--http", cfg.http]
    if cfg.config_path is not None:  # a run file goes by its absolute path, a shipped preset by its name
        spec = cfg.config_path.resolve() if cfg.config_path.exists() else cfg.config_path
        args += ["--config", str(spec)]
    for override in cfg.overrides:
        args += ["--set", override]
    if bootstrap is not None:
        args += ["--initial-peers", bootstrap]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(run_dir / f"node-{index}.log", "ab") as log_file:  # stdout too: its lines are for people
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=log_file, stderr=log_file, env=env, start_new_session=True
        )
    events = EventReader(events_path)
    node = NodeProcess(index=index, proc=proc, folder=folder, events=events)
    try:
        async with asyncio.timeout(cfg.start_timeout_s):
            node.maddr = (await events.wait_for(ListeningEvent, alive=_alive(proc))).maddrs[0]
            if Role.VALIDATOR not in role_args:
                node.stage = (await events.wait_for(ServingEvent, alive=_alive(proc))).stage
            http = events.first(HttpEvent)  # written before the node serves: read with the events above
            node.dashboard_url = http.url if http is not None else None
    except NodeEventError as e:
        if proc.returncode is None:  # a malformed events line, not an exit
            raise SwarmError(f"node {index}: {e}") from None
        code = await proc.wait()
        raise SwarmError(f"node {index} exited with code {code} while starting; see node-{index}.log") from None
    return node


def _alive(proc: asyncio.subprocess.Process) -> Callable[[], bool]:
    return lambda: proc.returncode is None


async def _watch(cfg: LaunchConfig, run: RunConfig, nodes: list[NodeProcess], view: LiveView) -> None:
    """Refresh the view from the DHT until every node process has exited."""
    dht_cfg = with_run_schemas(
        DHTConfig(
            initial_peers=tuple(n.maddr for n in nodes if n.maddr),
            client_mode=True,
            rpc_timeout_s=2.0,
            lookup_timeout_s=4.0,
            maintenance_interval_s=3600.0,
        )
    )
    waits = [asyncio.ensure_future(n.proc.wait()) for n in nodes]
    try:
        async with DHT.create(dht_cfg) as dht:
            honest_done_at: float | None = None
            while not all(w.done() for w in waits):
                if all(w.done() for w, n in zip(waits, nodes, strict=False) if not n.misbehaving):
                    # the honest swarm finished; cheaters cut off by its checks may never reach max_steps
                    honest_done_at = honest_done_at or time.monotonic()
                    if time.monotonic() - honest_done_at > CHEATER_GRACE_S:
                        log.warning(
                            "the honest nodes finished %.0fs ago; stopping the misbehaving ones", CHEATER_GRACE_S
                        )
                        break
                try:
                    async with asyncio.timeout(cfg.table_interval_s * 2):
                        swarm = SwarmView.parse(
                            await dht.get(peers_key(run.run_id), latest=True),
                            await dht.get(progress_key(run.run_id), latest=True),
                        )
                    # once a node exited, records vanish as nodes stop: the view keeps the peers it last saw
                    view.model.observe(
                        snapshot_of(swarm, run.pipeline.num_stages), finishing=any(w.done() for w in waits)
                    )
                    view.refresh()
                except (SwarmError, TimeoutError, OSError) as e:
                    log.warning("could not read the swarm's records for the view: %s", e)
                await asyncio.wait(waits, timeout=cfg.table_interval_s)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def _stop_all(nodes: list[NodeProcess]) -> None:
    """SIGTERM every node still running, wait, then SIGKILL what is left."""
    for node in nodes:
        if node.proc.returncode is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                await node.proc.wait()
        except TimeoutError:
            log.warning("node %d did not stop within %.0fs; killing it", node.index, STOP_GRACE_S)
            node.proc.kill()
            await node.proc.wait()


def _summarize(cfg: LaunchConfig, run: RunConfig, run_dir: Path, nodes: list[NodeProcess]) -> dict[str, Any]:
    """Aggregate the nodes' summary files into the run's JSON summary."""
    summaries = _read_summaries(nodes)
    per_step: dict[int, list[float]] = {}
    for s in summaries:
        for step, losses in s.losses.items():
            per_step.setdefault(step, []).extend(losses)
    curve = [sum(per_step[k]) / len(per_step[k]) for k in sorted(per_step)]
    evals: dict[int, list[float]] = {}  # step -> the validation losses computed of it (one, or equal ones)
    for s in summaries:
        for step, loss in s.eval_losses.items():
            evals.setdefault(step, []).append(loss)
    eval_curve = [[k, round(sum(evals[k]) / len(evals[k]), 4)] for k in sorted(evals)]
    stages: list[list[str]] = [[] for _ in range(run.pipeline.num_stages)]
    for s in summaries:
        if s.stage is not None:
            stages[s.stage].append(s.peer_id)
    samples = sum(s.samples for s in summaries)
    starts = [s.first_sample_time for s in summaries if s.first_sample_time]
    ends = [s.end_time for s in summaries if s.end_time]
    elapsed = max(ends) - min(starts) if starts and ends else 0.0
    # the run's steps: those of the honest training nodes (a cheater cut off by the checks may lag behind)
    steps = min((s.step for s in summaries if s.role != Role.VALIDATOR and not s.misbehaving), default=0)
    floor = make_source(run).loss_floor
    checks = rewards_summary([Path(s.ledger_path) for s in summaries if s.ledger_path], run.run_id)
    return {
        **checks,
        "misbehaving": sorted(s.peer_id for s in summaries if s.misbehaving),
        "ok": len(summaries) == len(nodes) and steps >= cfg.steps,
        "steps": steps,
        "initial_loss": round(curve[0], 4) if curve else None,
        "final_loss": round(curve[-1], 4) if curve else None,
        "loss_floor": round(floor, 4) if floor is not None else None,
        "loss_curve": [round(x, 4) for x in curve],
        "initial_eval_loss": eval_curve[0][1] if eval_curve else None,
        "final_eval_loss": eval_curve[-1][1] if eval_curve else None,
        "eval_curve": eval_curve,  # [step, validation loss] pairs, every eval.every_steps steps and at the end
        "stages": [sorted(p) for p in stages],
        "samples": samples,
        "samples_per_s": round(samples / elapsed, 2) if elapsed > 0 else 0.0,
        "tokens_per_s": round(samples * run.model.seq_len / elapsed, 1) if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 2),
        "run_id": run.run_id,
        "run_dir": str(run_dir),
        "exit_codes": [n.proc.returncode for n in nodes],
        "devices": sorted({s.device for s in summaries if s.device}),  # what the nodes' --device resolved to
        "precision": run.precision.compute,
        "peak_rss_bytes": [s.peak_rss_bytes for s in summaries],  # per node process, in the nodes' order
        "dashboard_url": nodes[0].dashboard_url if nodes else None,  # node 0's status page (gone with the run)
        "traffic": traffic_summary(summaries),
    }


def traffic_summary(summaries: list[NodeSummary]) -> dict[str, dict[str, float]]:
    """The wire bytes of all nodes together per RPC family (`swarm.p2p.traffic`): totals, and per step (the sum of
    each node's bytes per step, so a node that joined late counts at its own rate); per step by full method name
    too (``stage.forward`` and ``stage.backward`` carry the activations, ``stage.tied`` the tied gradient)."""
    totals: dict[str, dict[str, float]] = {
        "sent_bytes": {},
        "received_bytes": {},
        "sent_bytes_per_step": {},
        "received_bytes_per_step": {},
        "method_sent_bytes_per_step": {},
        "method_received_bytes_per_step": {},
    }
    for s in summaries:
        if s.traffic is None:
            continue
        for key, counts in totals.items():
            for family, value in getattr(s.traffic, key).items():
                counts[family] = counts.get(family, 0) + value
    return {key: {k: round(v, 1) for k, v in sorted(counts.items())} for key, counts in totals.items()}


def _read_summaries(nodes: list[NodeProcess]) -> list[NodeSummary]:
    """Every node's `NodeSummary`; a node that wrote none (it did not stop cleanly) or a bad one is left out."""
    summaries = []
    for node in nodes:
        path = node.folder / SUMMARY_FILE_NAME
        if not path.exists():
            continue
        try:
            summaries.append(NodeSummary.read(path))
        except SummaryError as e:
            log.warning("node %d: %s; leaving it out of the run's summary", node.index, e)
    return summaries
