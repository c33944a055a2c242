"""Export in the Hugging Face layout: a swarm of an hf run trains, exports, and `transformers` loads the result
with the same logits as the swarm's own `PipelineModel`; offline from a run directory (`--from-dir`) too."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

from swarm.errors import ConfigError, NotFoundError
from swarm.local.export import ExportConfig, _export, export_model
from swarm.local.export_hf import states_from_run_dir
from swarm.model import PipelineModel, build_stages
from swarm.run.config import RunConfig
from tests.model.hf_configs import SEQ_LEN, VOCAB, hf_run
from tests.training.swarm_harness import Swarm, stage_weights


def _pipeline_from_weights(run: RunConfig, weights: list[list[torch.Tensor]]) -> PipelineModel:
    stages = build_stages(run)
    with torch.no_grad():
        for stage, tensors in zip(stages, weights, strict=True):
            for p, value in zip(stage.parameters(), tensors, strict=True):
                p.copy_(value)
    return PipelineModel(stages).eval()


def _assert_same_logits(out_dir: Path, model: PipelineModel, vocab: int, seq_len: int) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(ids), rtol=1e-5, atol=1e-5)
        generated = loaded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied head
async def test_a_swarm_trains_and_its_hf_export_gives_the_pipelines_logits(tmp_path: Path, family: str) -> None:
    run = hf_run(tmp_path, family, num_stages=2)
    run = RunConfig.from_dict({**run.to_dict(), "batch": {"target_batch_size": 32, "microbatch_size": 16}})
    swarm = Swarm(run)
    try:
        nodes = [await swarm.add(seed=80 + i, stage=i, max_steps=2, record_period_s=30.0) for i in range(2)]
        async with asyncio.timeout(90):
            await asyncio.gather(*(n.task for n in nodes))
        out = tmp_path / "hf"
        steps = await _export(ExportConfig(run=run, initial_peers=(swarm.bootstrap,), out_path=out, format="hf"))
        assert steps == [2, 2]
        weights = [stage_weights(node) for node in nodes]
    finally:
        await swarm.close()
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors"}
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    trained = _pipeline_from_weights(run, weights)
    initial = PipelineModel(build_stages(run))
    assert not torch.equal(trained.stages[0].body.embed.weight, initial.stages[0].body.embed.weight)  # it trained
    _assert_same_logits(out, trained, VOCAB, SEQ_LEN)


def test_hf_export_refuses_the_tiny_gpt_and_a_missing_run_dir(tmp_path: Path) -> None:
    run = RunConfig.from_toml()
    with pytest.raises(NotFoundError, match="does not exist"):
        states_from_run_dir(run, tmp_path / "nowhere")
    with pytest.raises(NotFoundError, match="stage 0"):
        states_from_run_dir(run, tmp_path)
    from swarm.local.export_hf import write_hf

    with pytest.raises(ConfigError, match="family"):
        write_hf(run, [], tmp_path / "out")
    with pytest.raises(ConfigError, match="not both"):
        ExportConfig(run=run, initial_peers=("/ip4/127.0.0.1/tcp/1",), out_path=tmp_path, from_dir=tmp_path)
    with pytest.raises(ConfigError, match="initial_peers"):
        ExportConfig(run=run, out_path=tmp_path)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tiny_llama_preset_trains_in_a_local_swarm_and_exports_offline(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    node = [sys.executable, "-m", "swarm.cli.node"]
    proc = subprocess.run(
        [*node, "local", "--nodes", "2", "--steps", "3", "--config", "tiny_llama", "--json", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == 3 and summary["exit_codes"] == [0, 0]
    assert all(torch.isfinite(torch.tensor(summary["loss_curve"])))
    run = RunConfig.load("tiny_llama")
    states = states_from_run_dir(run, run_dir)
    assert [s.step for s in states] == [3, 3]
    # the tied embedding/head exchange kept stage 0's and the last stage's copies equal
    assert torch.equal(states[0].tensors["param.body.embed.weight"], states[1].tensors["param.body.lm_head.weight"])

    out = tmp_path / "hf"
    export = subprocess.run(
        [*node, "export", "--config", "tiny_llama", "--from-dir", str(run_dir), "--format", "hf", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert "stage steps: [3, 3]" in export.stdout
    stages = build_stages(run)
    model = _pipeline_from_weights(
        run, [[s.tensors[f"param.{n}"] for n, _ in st.named_parameters()] for s, st in zip(states, stages, strict=True)]
    )
    _assert_same_logits(out, model, run.model.vocab_size, run.model.seq_len)
    # the single-file export keeps working offline too
    single = tmp_path / "model.safetensors"
    assert export_model(ExportConfig(run=run, out_path=single, from_dir=run_dir)) == [3, 3]
    assert single.exists()
