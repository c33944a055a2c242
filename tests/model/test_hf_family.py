"""The ``hf`` model family: split equivalence with the unsplit `transformers` model, per family; the family
Protocol's round trip; seeded init; input checks; the run config's checks of an hf config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from swarm.errors import ConfigError
from swarm.model import (
    GptFamily,
    PipelineModel,
    StageInputError,
    StageModel,
    build_stages,
    family_for,
    lm_loss,
    merge_stage_tensors,
    split_whole_tensors,
)
from swarm.model import build_stage
from swarm.model.hf import build_hf_model, hf_transformers_config
from swarm.model.sizes import model_sizes
from swarm.run.config import RunConfig
from tests.model.hf_configs import SEQ_LEN, TINY_CONFIGS, VOCAB, hf_run


def _staged_forward_backward(
    stages: list[StageModel], ids: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As the swarm runs them: each stage on a detached input; the activation gradient sent back by hand."""
    inputs, outputs = [], []
    x = ids
    for stage in stages:
        x_in = x.detach().requires_grad_(x.is_floating_point())
        stage.input_spec.check(x_in, stage=stage.index, max_batch=8)
        inputs.append(x_in)
        x = stage(x_in)
        outputs.append(x)
    loss = stages[-1].loss(x, targets)
    loss.backward()
    for i in range(len(stages) - 2, -1, -1):
        grad = inputs[i + 1].grad
        assert grad is not None
        outputs[i].backward(grad)
    return x.detach(), loss.detach()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("num_stages", [1, 3])
def test_staged_forward_and_backward_equal_the_unsplit_transformers_model(
    tmp_path: Path, family: str, num_stages: int
) -> None:
    run = hf_run(tmp_path, family, num_stages=num_stages, seed=5)
    stages = build_stages(run)
    reference = build_hf_model(run.model.hf_dict(), run.seed)
    whole = dict(reference.named_parameters())
    names = family_for(run).whole_names(run, stages)
    for stage, stage_names in zip(stages, names, strict=True):  # the same seeded weights
        for name, p in stage.named_parameters():
            assert torch.equal(p, whole[stage_names[name]]), name
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, SEQ_LEN + 1), generator=generator)
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    logits, loss = _staged_forward_backward(stages, ids, targets)
    ref_logits = reference(input_ids=ids).logits
    ref_loss = lm_loss(ref_logits, targets)
    ref_loss.backward()

    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    seen = set()
    for stage, stage_names in zip(stages, names, strict=True):
        for name, p in stage.named_parameters():
            ref_grad = whole[stage_names[name]].grad
            assert p.grad is not None and ref_grad is not None, name
            torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-6, msg=f"{family} {name}")
            seen.add(stage_names[name])
    assert seen == set(whole)  # every parameter of the whole model lives in some stage


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_a_node_builds_only_its_stage_with_the_same_weights(tmp_path: Path, family: str) -> None:
    run = hf_run(tmp_path, family, num_stages=3, seed=7)
    sizes = model_sizes(hf_transformers_config(run.model.hf_dict()), 3)
    for index, full in enumerate(build_stages(run)):
        alone = build_stage(run, index)
        want = dict(full.named_parameters())
        got = dict(alone.named_parameters())
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want), index
        assert all(p.device.type == "cpu" for p in got.values())
        assert sum(p.numel() for p in got.values()) == sizes.stage_params[index]  # its pieces, nothing else
        ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(index))
        width = int(run.model.hf_dict().get("hidden_size") or run.model.hf_dict()["n_embd"])
        x = ids if index == 0 else torch.randn(2, SEQ_LEN, width, generator=torch.Generator().manual_seed(index))
        torch.testing.assert_close(alone(x), full(x))


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_stage_masks_causally(tmp_path: Path, family: str) -> None:
    model = PipelineModel(build_stages(hf_run(tmp_path, family, num_stages=2)))
    ids = torch.randint(0, VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])  # no position sees a later token
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_the_tied_matrix_is_named_on_the_first_and_last_stage_only(tmp_path: Path) -> None:
    stages = build_stages(hf_run(tmp_path, "llama", num_stages=3))
    assert [s.tied_name for s in stages] == ["body.embed.weight", None, "body.lm_head.weight"]
    assert stages[0].get_parameter("body.embed.weight") is stages[2].get_parameter("body.lm_head.weight")
    untied = build_stages(hf_run(tmp_path, "qwen2", num_stages=3))
    assert [s.tied_name for s in untied] == [None, None, None]


def test_init_is_seeded(tmp_path: Path) -> None:
    a = PipelineModel(build_stages(hf_run(tmp_path, "qwen3", num_stages=2, seed=3))).state_dict()
    b = PipelineModel(build_stages(hf_run(tmp_path, "qwen3", num_stages=2, seed=3))).state_dict()
    c = PipelineModel(build_stages(hf_run(tmp_path, "qwen3", num_stages=2, seed=4))).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].dim() == 2)


@pytest.mark.parametrize("which", ["gpt", "llama", "gpt2", "qwen2"])
def test_family_protocol_round_trip(tmp_path: Path, which: str) -> None:
    run = RunConfig.from_toml() if which == "gpt" else hf_run(tmp_path, which, num_stages=3)
    family = family_for(run)
    assert isinstance(family, GptFamily) == (which == "gpt")
    stages = family.build_stages(run)
    names = family.whole_names(run, stages)
    per_stage = [{n: p.detach() for n, p in s.named_parameters()} for s in stages]
    whole = merge_stage_tensors(names, per_stage)
    back = split_whole_tensors(names, whole)
    assert [set(s) for s in back] == [set(s) for s in per_stage]
    for got, want in zip(back, per_stage, strict=True):
        assert all(torch.equal(got[n], want[n]) for n in want)
    if which == "gpt":
        assert set(whole) == {n for n, _ in PipelineModel(stages).named_parameters()}
    else:
        reference = build_hf_model(run.model.hf_dict(), run.seed)
        assert set(whole) == {n for n, _ in reference.named_parameters()}  # transformers' own names
    with pytest.raises(ConfigError, match="lack"):
        split_whole_tensors(names, dict(list(whole.items())[1:]))


def test_stage_inputs_are_still_checked(tmp_path: Path) -> None:
    stages = build_stages(hf_run(tmp_path, "llama", num_stages=2))
    with pytest.raises(StageInputError, match="range"):
        stages[0].input_spec.check(torch.full((1, SEQ_LEN), VOCAB), stage=0, max_batch=4)
    with pytest.raises(StageInputError, match="shape"):
        stages[1].input_spec.check(torch.zeros(1, SEQ_LEN, 31), stage=1, max_batch=4)
    with pytest.raises(StageInputError, match="non-finite"):
        stages[1].input_spec.check(torch.full((1, SEQ_LEN, 32), float("nan")), stage=1, max_batch=4)


def test_the_run_config_checks_the_hf_config(tmp_path: Path) -> None:
    run = hf_run(tmp_path, "llama", num_stages=2)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        RunConfig.from_dict({**run.to_dict(), "model": {**run.to_dict()["model"], "vocab_size": VOCAB + 1}})
    with pytest.raises(ConfigError, match="decoder layers"):
        hf_run(tmp_path, "llama", num_stages=5)
    with pytest.raises(ConfigError, match="model_type"):
        hf_run(tmp_path, "llama", num_stages=2, model_type="mixtral")
    with pytest.raises(ConfigError, match="exactly one"):
        RunConfig.from_dict({"model": {"family": "hf"}})
    with pytest.raises(ConfigError, match=r"model\.family"):
        RunConfig.from_dict({"model": {"hf_preset": "tiny_llama"}})
    # the config file's content is part of the run id: an edited file is another run
    run = hf_run(tmp_path, "llama", num_stages=2)
    before = run.run_id
    assert dataclasses.replace(run).run_id == before
    edited = hf_run(tmp_path, "llama", num_stages=2, rms_norm_eps=1e-5)  # rewrites the same file
    assert json.loads(Path(run.model.hf_config).read_text())["rms_norm_eps"] == 1e-5
    assert edited.to_dict() == run.to_dict() and edited.run_id != before
