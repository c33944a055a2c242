"""The status page in headless Chromium (Debian's ``chromium``, driven with ``--dump-dom`` and ``--screenshot``),
served by node 0 of a running `swarm-node local` swarm:

- it loads with no console error (Chromium's console log on stderr, and the page's own error box);
- it shows one row per stage and both loss curves (training and validation);
- it updates as steps advance (a later load shows a later step and a longer curve; within a load it re-polls).

With ``SWARM_UPDATE_SCREENSHOT=1`` the screenshot of the last load is copied to docs/status-page.png (the README
shows it) once every check passed; otherwise it stays in the test's temporary folder, and the checkout is not
changed.
Skipped, with the reason, when chromium is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from swarm.local.events import EventReader, HttpEvent
from swarm.run.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "status-page.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NUM_NODES = 2
START_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 90.0
BROWSER_TIMEOUT_S = 60.0


@contextlib.contextmanager
def local_swarm(run_dir: Path) -> Iterator[str]:
    """`swarm-node local` running (small steps, evaluation every 2); yields node 0's dashboard URL; stops it all."""
    cmd = [sys.executable, "-m", "swarm.cli.node", "local", "--nodes", str(NUM_NODES), "--steps", "400"]
    cmd += ["--set", "eval.every_steps=2", "--set", "batch.target_batch_size=64", "--set", "eval.batches=1"]
    cmd += ["--run-dir", str(run_dir), "--device", "cpu", "--timeout", "600"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(run_dir.parent / "launcher.log", "wb") as out:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        event = EventReader(run_dir / "node-0" / "events.jsonl").wait_for_blocking(
            HttpEvent, alive=lambda: launcher.poll() is None, timeout_s=START_TIMEOUT_S
        )
        children = psutil.Process(launcher.pid).children(recursive=True)
        yield event.url
    finally:
        children += psutil.Process(launcher.pid).children(recursive=True) if launcher.poll() is None else []
        launcher.send_signal(signal.SIGINT)  # the launcher stops every node it started
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait(timeout=10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def api_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/status", timeout=10) as reply:
        result: dict[str, Any] = json.load(reply)
        return result


def wait_for_status(url: str, check: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        status = api_status(url)
        if check(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(status)[:2000]}")


def chromium(url: str, profile: Path, *mode: str) -> tuple[str, list[str]]:
    """One headless load of ``url`` (3 s of virtual time: about three polls): stdout, and the console lines."""
    assert CHROMIUM is not None
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,1000",
            "--virtual-time-budget=3000",
            *mode,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def page_facts(dom: str) -> dict[str, Any]:
    """What the checks read from a dumped DOM."""
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None, dom[:2000]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    curve = {name: re.search(rf'id="{name}-curve"[^>]*\bd="([^"]*)"', dom) for name in ("train", "eval")}
    return {
        "polls": int(attrs.get("polls", "0")),
        "errors": int(attrs.get("errors", "0")),
        "step": int(attrs["step"]) if attrs.get("step", "-").isdigit() else None,
        "stage_rows": len(re.findall(r'<tr class="stage-row"', dom)),
        "train_points": len(re.findall("[ML]", curve["train"].group(1))) if curve["train"] else 0,
        "eval_points": len(re.findall("[ML]", curve["eval"].group(1))) if curve["eval"] else 0,
        "error_box_hidden": re.search(r'<pre id="errors" hidden', dom) is not None,
    }


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_status_page_in_headless_chromium(tmp_path: Path) -> None:
    stages = RunConfig.from_toml().pipeline.num_stages
    with local_swarm(tmp_path / "run") as url:
        assert url.startswith("http://127.0.0.1:")
        wait_for_status(url, lambda s: len(s["eval_curve"]) >= 1 and len(s["loss_curve"]) >= 2, "both curves")
        started = time.monotonic()
        dom, console = chromium(url, tmp_path / "profile", "--dump-dom")
        load_s = time.monotonic() - started
        first = page_facts(dom)
        assert console == [], console
        assert first["errors"] == 0 and first["error_box_hidden"], dom[-3000:]
        assert first["polls"] >= 2, first  # the page re-polls within one load
        assert first["stage_rows"] == stages, first
        assert first["train_points"] >= 2 and first["eval_points"] >= 1 and first["step"] is not None, first
        assert 'id="eval-points"><circle' in dom  # the validation curve's points are drawn
        # the curves are refreshed every `refresh_s`, the step on each read: wait for both to move on
        wait_for_status(
            url,
            lambda s: s["step"] >= first["step"] + 2 and len(s["loss_curve"]) > first["train_points"],
            f"step {first['step'] + 2} and a training curve longer than {first['train_points']} points",
        )
        shot = tmp_path / "status-page.png"
        dom, console = chromium(url, tmp_path / "profile", "--dump-dom", f"--screenshot={shot}")
        later = page_facts(dom)
        assert console == [] and later["errors"] == 0, (console, dom[-3000:])
        assert later["step"] >= first["step"] + 2 and later["train_points"] > first["train_points"], (first, later)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("SWARM_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    print(f"status page: one headless load (3 s of virtual time, about 3 polls) took {load_s:.2f}s")
