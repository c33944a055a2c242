"""The launcher's view (`swarm.local.run_view`, `swarm.local.live_view`): its numbers from a scripted run with an
injected clock, the final frame that keeps the peers, the in-place frame on a terminal and plain lines elsewhere."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from swarm.local.live_view import LiveView, plain_line
from swarm.local.run_view import RunViewModel, Snapshot, StageRow, snapshot_of, step_samples_per_s
from swarm.p2p.identity import Identity
from swarm.training.messages import PeerRecord
from swarm.training.node_role import Role
from swarm.training.progress import ProgressRecord
from swarm.training.view import SwarmView

PEERS = [Identity.from_seed(bytes([i + 1]) * 32).peer_id.to_base58() for i in range(4)]
BATCH = 256


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def snap(step: int | None, *, peers: bool = True, loss: float | None = None) -> Snapshot:
    rows = tuple(
        StageRow(stage=s, peers=tuple(PEERS[2 * s : 2 * s + 2]) if peers else (), step=step if peers else None)
        for s in range(2)
    )
    return Snapshot(stages=rows, step=step, loss=loss)


def scripted(clock: Clock, model: RunViewModel, script: list[tuple[float, Snapshot, bool]]) -> None:
    for at, snapshot, finishing in script:
        clock.now = at
        model.observe(snapshot, finishing=finishing)


def test_rate_and_eta_come_from_completed_steps_seen_advancing() -> None:
    clock = Clock()
    model = RunViewModel(total_steps=10, batch_size=BATCH, num_stages=2, clock=clock)
    # nodes start (no step for 20 s), then the first completion seen is step 3 at t=130: the steps before it took
    # an unknown time (the old ETA divided the time since then by 3 and read about 0 s)
    scripted(clock, model, [(100.0, snap(None), False), (120.0, snap(0), False), (130.0, snap(3, loss=3.2), False)])
    assert model.step == 3 and model.samples_per_s is None and model.eta_s is None
    clock.now = 134.0
    model.observe(snap(5, loss=2.9))  # 2 steps in 4 s
    assert model.samples_per_s == pytest.approx(2 * BATCH / 4.0)
    assert model.eta_s == pytest.approx((10 - 5) * 2.0)  # 10 s at 0.5 steps/s
    clock.now = 138.0
    model.observe(snap(5))  # no new step: the rate falls, the ETA grows, the loss stays
    assert model.samples_per_s == pytest.approx(2 * BATCH / 8.0) and model.eta_s == pytest.approx(20.0)
    assert model.loss == 2.9
    clock.now = 140.0
    model.observe(snap(12))  # never past N
    assert model.step == 10 and model.eta_s == 0.0
    assert step_samples_per_s(10, BATCH, 0.0) is None


def test_final_frame_keeps_the_last_real_peers_and_shows_the_summary() -> None:
    clock = Clock()
    model = RunViewModel(total_steps=6, batch_size=BATCH, num_stages=2, clock=clock)
    scripted(clock, model, [(1.0, snap(2), False), (2.0, snap(4), False)])
    # a node exited: the records of the stopping nodes vanish, the view keeps the peers it saw
    scripted(clock, model, [(3.0, snap(None, peers=False), True), (4.0, snap(None, peers=False), False)])
    assert [r.peers for r in model.stages] == [tuple(PEERS[:2]), tuple(PEERS[2:])] and model.step == 4
    summary = {
        "steps": 6,
        "final_loss": 1.5,
        "eval_curve": [[0, 4.0], [6, 1.7]],
        "elapsed_s": 12.0,
        "stages": [PEERS[:2], PEERS[2:]],
    }
    model.finish(summary)
    assert model.done and model.step == 6 and model.loss == 1.5 and model.eval == (6, 1.7)
    assert model.samples_per_s == pytest.approx(6 * BATCH / 12.0)  # the same definition, over the whole run
    assert [r.step for r in model.stages] == [6, 6]
    out = io.StringIO()
    view = LiveView(model, stream=out, live=True, width=120)
    view.finish()
    frame = out.getvalue()
    assert all(p[-6:] in frame for p in PEERS) and "waiting for a peer" not in frame
    assert "step 6 of 6" in frame and "128.0" in frame and "eval 1.700 (step 6)" in frame


def test_an_empty_stage_while_every_node_runs_is_shown_as_waiting() -> None:
    model = RunViewModel(total_steps=6, batch_size=BATCH, num_stages=2, clock=Clock())
    model.observe(snap(2))
    model.observe(snap(2, peers=False))  # no node exited: the emptiness is real
    assert model.num_peers == 0 and "stage 0: 0 peers" in plain_line(model)
    out = io.StringIO()
    LiveView(model, stream=out, live=True, width=120).finish()
    assert "waiting for a peer" in out.getvalue()


def test_plain_lines_when_the_stream_is_not_a_terminal() -> None:
    clock = Clock()
    model = RunViewModel(total_steps=4, batch_size=BATCH, num_stages=2, clock=clock)
    out = io.StringIO()
    with LiveView(model, stream=out) as view:  # a StringIO is no terminal
        assert not view.is_live
        view.note("node 0: /ip4/127.0.0.1/tcp/1 serving stage 0")
        for at, step in [(1.0, 1), (2.0, 1), (3.0, 2), (4.0, 3)]:
            clock.now = at
            model.observe(snap(step, loss=2.0))
            view.refresh()
        model.dashboard_url = "http://127.0.0.1:8000/"
        model.finish({"steps": 4, "elapsed_s": 4.0, "stages": [PEERS[:2], PEERS[2:]]})
        view.finish()
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()  # no terminal codes in a log
    assert lines[0].startswith("node 0:")
    assert [line.split()[1] for line in lines[1:4]] == ["1/4", "2/4", "3/4"]  # one line per new step
    # one step in the 2 s since the first completion seen (t=1): 128 samples/s, 2 steps left take 4 s
    assert lines[2] == "step 2/4  loss 2.000  samples/s 128.0  ETA 4s  |  stage 0: 2 peers; stage 1: 2 peers"
    assert lines[4] == "dashboard: http://127.0.0.1:8000/"
    assert lines[5].startswith("final: step 4/4") and "samples/s 256.0  ETA done" in lines[5]  # 4 x 256 / 4 s


def test_the_live_frame_is_redrawn_in_place() -> None:
    clock = Clock()
    model = RunViewModel(total_steps=4, batch_size=BATCH, num_stages=2, clock=clock)
    model.dashboard_url = "http://127.0.0.1:8000/"
    out = io.StringIO()
    view = LiveView(model, stream=out, live=True, width=120)
    view.start()
    assert "(reading the run's records)" in out.getvalue() and "waiting for a peer" not in out.getvalue()
    for at, step in [(1.0, 1), (2.0, 2)]:
        clock.now = at
        model.observe(snap(step, loss=2.0))
        view.refresh()
    view.stop()
    text = out.getvalue()
    assert "\x1b[1A" in text and "\x1b[2K" in text  # cursor up, erase line: the frame is drawn over itself
    assert "dashboard http://127.0.0.1:8000/" in text and "step 2 of 4" in text
    assert text.count("samples/s: samples of completed steps (256 per step) per second of wall time") >= 3


def test_snapshot_of_a_view_counts_the_peers_reachability() -> None:
    a, b, c = (Identity.from_seed(bytes([i]) * 32).peer_id for i in (7, 8, 9))
    view = SwarmView()
    base = {"role": Role.AUTO, "maddrs": [], "throughput": 4000.0, "config_hash": "h"}
    view.peers[a] = PeerRecord(stage=0, step=5, reachability="public", **base)
    view.peers[b] = PeerRecord(stage=0, step=6, reachability="relayed", **base)
    view.peers[c] = PeerRecord(stage=1, step=6, **base)  # a node that has not learned it yet
    view.progress[a] = ProgressRecord(step=6, samples=32, samples_per_s=300.0, loss=2.5)
    shot = snapshot_of(view, 2)
    assert shot.step == 6 and shot.loss == 2.5 and shot.num_peers == 3
    assert dict(shot.stages[0].reachability) == {"public": 1, "relayed": 1}
    assert dict(shot.stages[1].reachability) == {"unknown": 1}
    model = RunViewModel(total_steps=10, batch_size=BATCH, num_stages=2, clock=Clock())
    model.observe(shot)
    assert "stage 0: 2 peers (1 public, 1 relayed); stage 1: 1 peers (1 unknown)" in plain_line(model)
    out = io.StringIO()
    LiveView(model, stream=out, live=True, width=120).finish()
    assert "reachability" in out.getvalue() and "1 public, 1 relayed" in out.getvalue()


def test_log_lines_print_above_the_live_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)  # what the launcher's view and its log handler both write to
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        view = LiveView(
            RunViewModel(total_steps=4, batch_size=BATCH, num_stages=2, clock=Clock()), stream=out, live=True
        )
        view.start()
        assert handler.stream is not out  # Live's stderr proxy: a line is printed above the frame
        logging.getLogger("swarm.local.launcher").warning("could not read the swarm's records")
        view.refresh()
        view.stop()
        assert handler.stream is out
    finally:
        root.removeHandler(handler)
    assert "WARNING could not read the swarm's records" in out.getvalue()
