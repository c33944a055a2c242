"""A Hugging Face export of a run trained on token shards carries the run's tokenizer: `AutoTokenizer` loads it
from the export folder and encodes text to the same ids as the shards' tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.data.manifest import Manifest
from swarm.data.tokenizer import load_tokenizer
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stages
from swarm.run.config import RunConfig
from swarm.training.checkpoint import capture_state
from tests.data.corpus import VOCAB_SIZE

transformers = pytest.importorskip("transformers")


def _hf_shards_run(manifest: Path) -> RunConfig:
    return RunConfig.from_dict(
        {
            "name": "hf-shards",
            "model": {"family": "hf", "hf_preset": "tiny_llama", "vocab_size": VOCAB_SIZE, "seq_len": 32},
            "data": {"source": "shards", "manifest": str(manifest)},
        }
    )


def test_the_hf_export_of_a_shards_run_holds_its_tokenizer(built_shards: Manifest, tmp_path: Path) -> None:
    from swarm.local.export_hf import tokenizer_file, write_hf

    run = _hf_shards_run(built_shards.folder / "manifest.json")
    states = []
    for index, stage in enumerate(build_stages(run)):
        optimizer = make_optimizer(stage.parameters(), run.optimizer)
        states.append(capture_state(stage, optimizer, run_id=run.run_id, stage=index, step=0))
    write_hf(run, states, tmp_path / "out")
    text = "def main(argv):\n    return sorted(argv)\n"
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ours = load_tokenizer(built_shards.folder / built_shards.tokenizer_file)
    assert exported(text)["input_ids"] == ours.encode(text).ids
    assert exported.eos_token == "<|endoftext|>" and exported.eos_token_id == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).config.vocab_size == VOCAB_SIZE
    markov = RunConfig.from_dict({"name": "m"})
    assert tokenizer_file(markov) is None  # a run without a tokenizer exports the model alone
