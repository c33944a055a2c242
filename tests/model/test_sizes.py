"""The stated sizes of the shipped model presets: computed from the config, checked against the model itself
(built on the meta device: no memory) and against the table in docs/training.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

from swarm.model.hf import _parts, hf_transformers_config
from swarm.model.sizes import model_sizes
from swarm.model.stages import stage_block_ranges
from swarm.run.hf_config import hf_preset_names, read_hf_config
from tests.model.hf_configs import TINY_CONFIGS

# the stage counts docs/training.md states each preset's memory for
DOC_STAGES = {"tiny_llama": 2, "tiny_llama_2k": 2, "llama_20m": 2, "llama_150m": 4, "llama_1b": 4, "llama_8b": 8}


def preset_row(name: str) -> str:
    """The preset's row of the table in docs/training.md."""
    config = hf_transformers_config(read_hf_config(preset=name))
    sizes = model_sizes(config, DOC_STAGES[name])
    per_stage = " / ".join(f"{n / 1e6:.1f}M" for n in sizes.stage_params)
    memory = " / ".join(f"{b / 2**30:.2f}" for b in sizes.stage_train_bytes)
    return f"| `{name}` | {sizes.total_params / 1e6:.1f}M | {DOC_STAGES[name]} | {per_stage} | {memory} |"


def _meta_stage_params(config: object, num_stages: int) -> tuple[int, list[int]]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parts = _parts(model)
    total = sum(p.numel() for p in model.parameters())
    counts = []
    for i, layers in enumerate(stage_block_ranges(len(parts["layers"]), num_stages)):
        modules = [parts["layers"][b] for b in layers]
        if i == 0:
            modules += [parts["embed"], *([parts["positions"]] if "positions" in parts else [])]
        if i == num_stages - 1:
            modules += [parts["norm"], model.get_output_embeddings()]
        unique = {id(p): p for m in modules for p in m.parameters()}
        counts.append(sum(p.numel() for p in unique.values()))
    return total, counts


@pytest.mark.parametrize("name", hf_preset_names())
def test_preset_sizes_match_the_model(name: str) -> None:
    assert set(DOC_STAGES) == set(hf_preset_names())
    config = hf_transformers_config(read_hf_config(preset=name))
    for num_stages in sorted({1, 2, DOC_STAGES[name]}):
        sizes = model_sizes(config, num_stages)
        total, counts = _meta_stage_params(config, num_stages)
        assert sizes.total_params == total
        assert list(sizes.stage_params) == counts


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_sizes_of_each_family_match_the_model(family: str) -> None:
    fields = dict(TINY_CONFIGS[family])
    config = hf_transformers_config(fields)
    sizes = model_sizes(config, 3)
    assert (sizes.total_params, list(sizes.stage_params)) == _meta_stage_params(config, 3)


def test_the_docs_state_each_presets_sizes() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [preset_row(name) for name in hf_preset_names() if preset_row(name) not in text]
    assert not missing, "docs/training.md lacks (or misstates) these rows:\n" + "\n".join(missing)
