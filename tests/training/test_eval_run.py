"""Process test: the llama_stdlib preset (a tiny Llama on the Python standard library's sources) trained by a local
swarm of 4 nodes for 20 steps; its validation loss starts near ln(vocab) and falls well below it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from swarm.run.config import RunConfig

NODES, STEPS = 4, 20


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_llama_stdlib_validation_loss_falls_well_below_ln_vocab(tmp_path: Path) -> None:
    run = RunConfig.load("llama_stdlib")
    every, vocab = run.eval.every_steps, run.model.vocab_size
    assert every > 0 and run.data.source == "stdlib" and run.model.family == "hf"
    command = [sys.executable, "-m", "swarm.cli.node", "local", "--nodes", str(NODES), "--steps", str(STEPS)]
    proc = subprocess.run(
        [*command, "--config", "llama_stdlib", "--json", "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=tmp_path,
        env={**os.environ, "SWARM_CACHE_DIR": str(tmp_path / "cache")},  # builds the stdlib shards afresh
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] >= STEPS, summary
    # validation losses of due steps only (0, every, 2 * every, ...), the initial and the final weights among them
    # (an evaluation is dropped when its step closes first, which a busy machine can make happen to step 0's: the
    # loss at random init is then the known ln(vocab) rather than a measured one)
    steps = [step for step, _ in summary["eval_curve"]]
    assert steps[-1] == STEPS and set(steps) <= {*range(0, STEPS, every), STEPS}, summary
    initial, final = summary["initial_eval_loss"], summary["final_eval_loss"]
    if steps[0] == 0:
        assert abs(initial - math.log(vocab)) < 0.3, summary  # random init: about uniform over the vocabulary
    assert final < math.log(vocab) - 0.5 and final < initial, summary["eval_curve"]
    assert summary["final_loss"] < summary["initial_loss"] - 0.5, summary  # the training loss beside it
