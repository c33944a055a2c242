"""The run config's activation bottleneck (`pipeline.activation_bottleneck_ratio`) in the stages both families build:
the wire carries width / ratio features, gradients reach both projections and the stages on either side, the 8-bit
codecs still work on top, the projections travel in stage states (checkpoints, joins) and in the single-file export,
and the Hugging Face export refuses such a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swarm.compression import get_codec
from swarm.compression.bottleneck import BottleneckDown, BottleneckUp
from swarm.compression.wire import deserialize_tensor, serialize_tensor
from swarm.errors import ConfigError
from swarm.local.export import write_checkpoint
from swarm.local.export_hf import write_hf
from swarm.model import PipelineModel, build_stage, build_stages
from swarm.model.families import family_for
from swarm.model.optim import make_optimizer
from swarm.model.stages import StageInputError, StageModel
from swarm.run.config import RunConfig
from swarm.training.checkpoint import CheckpointError, apply_state, capture_state

RATIO = 8


def gpt_run(ratio: int = RATIO, stages: int = 2, extra: tuple[str, ...] = ()) -> RunConfig:
    sets = [f"pipeline.activation_bottleneck_ratio={ratio}", f"pipeline.num_stages={stages}", "model.num_blocks=3"]
    return RunConfig.load(None, [*sets, *extra])


def batch(run: RunConfig, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, run.model.vocab_size, (size, run.model.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def test_each_boundary_carries_width_over_ratio_features_and_checks_them() -> None:
    run = gpt_run(stages=3)
    stages = build_stages(run)
    assert isinstance(stages[0].bottleneck_down, BottleneckDown) and stages[0].bottleneck_up is None
    assert isinstance(stages[1].bottleneck_up, BottleneckUp) and isinstance(stages[1].bottleneck_down, BottleneckDown)
    assert stages[2].bottleneck_down is None
    ids, _ = batch(run)
    narrow = run.model.d_model // RATIO
    x = ids
    for stage in stages[:-1]:
        x = stage(x)
        assert x.shape == (4, run.model.seq_len, narrow)
        stages[stage.index + 1].input_spec.check(x, stage=stage.index + 1, max_batch=8)
    wide = torch.zeros(4, run.model.seq_len, run.model.d_model)
    with pytest.raises(StageInputError):
        stages[1].input_spec.check(wide, stage=1, max_batch=8)
    assert stages[-1](x).shape == (4, run.model.seq_len, run.model.vocab_size)


def test_a_node_that_builds_only_its_stage_gets_the_same_projections() -> None:
    run = gpt_run(stages=3)
    for full in build_stages(run):
        alone = dict(build_stage(run, full.index).named_parameters())
        want = dict(full.named_parameters())
        assert set(alone) == set(want) and any(n.startswith("bottleneck_") for n in want)
        assert all(torch.equal(alone[n], want[n]) for n in want), full.index
    a, b = build_stages(run), build_stages(gpt_run(stages=3, extra=("seed=1",)))
    assert not torch.equal(a[0].bottleneck_down.proj.weight, b[0].bottleneck_down.proj.weight)  # type: ignore[union-attr]


def test_gradients_reach_both_projections_and_the_stages_on_either_side() -> None:
    run = gpt_run()
    model = PipelineModel(build_stages(run))
    ids, targets = batch(run)
    model.loss(ids, targets).backward()
    stages = [s for s in model.stages if isinstance(s, StageModel)]
    for stage in stages:
        for name, p in stage.named_parameters():
            if "positions" in name:  # zero-initialised position table: its gradient is real but may be tiny
                continue
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"stage {stage.index} {name} got no gradient"
    down = stages[0].bottleneck_down
    up = stages[1].bottleneck_up
    assert down is not None and up is not None
    assert {n for n, _ in down.named_parameters()} == {"norm.weight", "norm.bias", "proj.weight", "proj.bias"}
    assert {n for n, _ in up.named_parameters()} == {"proj.weight", "proj.bias"}


def test_the_bottleneck_trains_end_to_end_and_its_init_leaves_the_model_as_it_was() -> None:
    run = gpt_run()
    plain = build_stages(gpt_run(ratio=1))
    stages = build_stages(run)
    again = build_stages(run)
    for a, b in zip(stages, again, strict=True):  # deterministic: every node builds the same weights
        for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert torch.equal(pa, pb), na
    for a, p in zip(stages, plain, strict=True):  # the bottleneck's init draws from its own stream
        body = {n: t for n, t in a.named_parameters() if not n.startswith("bottleneck_")}
        assert body.keys() == dict(p.named_parameters()).keys()
        assert all(torch.equal(body[n], t) for n, t in p.named_parameters())
    model = PipelineModel(stages)
    optimizer = make_optimizer(model.parameters(), run.optimizer)
    ids, targets = batch(run, size=16)
    losses = []
    for _ in range(30):
        loss = model.loss(ids, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_the_8bit_codecs_still_work_on_the_narrow_activations() -> None:
    run = gpt_run()
    stages = build_stages(run)
    ids, _ = batch(run, size=16)
    with torch.no_grad():
        boundary = stages[0](ids)
        exact = stages[1](boundary)
        for name in ("blockwise8", "uniform8"):
            wire = serialize_tensor(boundary, get_codec(name))
            assert len(wire) < boundary.numel() * 2  # ~1 byte a value, against 4 in fp32
            back = deserialize_tensor(wire)
            stages[1].input_spec.check(back, stage=1, max_batch=16)
            out = stages[1](back)
            assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.99


def test_bf16_precision_sends_narrow_bf16_activations() -> None:
    run = gpt_run(extra=('precision.compute="bf16"',))
    stages = build_stages(run)
    ids, _ = batch(run)
    x = stages[0](ids)
    assert x.dtype == torch.bfloat16 and x.shape[-1] == run.model.d_model // RATIO
    stages[1].input_spec.check(x, stage=1, max_batch=8)
    assert stages[1](x).dtype == torch.float32


def test_stage_states_carry_the_projections_checkpoint_and_join(tmp_path: Path) -> None:
    run = gpt_run()
    trained, fresh = build_stages(run), build_stages(run)
    for stage in (0, 1):
        model = trained[stage]
        optimizer = make_optimizer(model.parameters(), run.optimizer)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        state = capture_state(model, optimizer, run_id=run.run_id, stage=stage, step=5)
        part = "bottleneck_down" if stage == 0 else "bottleneck_up"
        assert f"param.{part}.proj.weight" in state.tensors
        target = fresh[stage]
        apply_state(target, make_optimizer(target.parameters(), run.optimizer), state, run_id=run.run_id, stage=stage)
        for (name, p), (_, q) in zip(model.named_parameters(), target.named_parameters(), strict=True):
            assert torch.equal(p, q), name
        plain = build_stages(gpt_run(ratio=1))[stage]  # a state without them is refused, not half-loaded
        old = capture_state(
            plain, make_optimizer(plain.parameters(), run.optimizer), run_id=run.run_id, stage=stage, step=5
        )
        with pytest.raises(CheckpointError, match="lacks parameters"):
            apply_state(target, make_optimizer(target.parameters(), run.optimizer), old, run_id=run.run_id, stage=stage)


def test_the_single_file_export_keeps_the_projections_and_the_hf_export_refuses(tmp_path: Path) -> None:
    run = gpt_run()
    stages = build_stages(run)
    states = [
        capture_state(s, make_optimizer(s.parameters(), run.optimizer), run_id=run.run_id, stage=s.index, step=1)
        for s in stages
    ]
    out = tmp_path / "model.safetensors"
    write_checkpoint(run, states, out)
    tensors = load_file(str(out))
    assert torch.equal(
        tensors["stages.0.bottleneck_down.proj.weight"], states[0].tensors["param.bottleneck_down.proj.weight"]
    )
    assert "stages.1.bottleneck_up.proj.bias" in tensors
    loaded = PipelineModel(build_stages(run))
    loaded.load_state_dict(tensors)
    hf = RunConfig.load("tiny_llama", [f"pipeline.activation_bottleneck_ratio={RATIO}"])
    with pytest.raises(ConfigError, match="activation_bottleneck_ratio"):
        write_hf(hf, [], tmp_path / "hf")


@pytest.mark.slow
def test_the_hf_family_gets_the_bottleneck_too() -> None:
    pytest.importorskip("transformers")
    run = RunConfig.load("tiny_llama", ["pipeline.activation_bottleneck_ratio=32"])
    stages = build_stages(run)
    names = family_for(run).whole_names(run, stages)
    assert names[0]["bottleneck_down.proj.weight"] == "bottlenecks.0.down.proj.weight"
    assert names[1]["bottleneck_up.proj.weight"] == "bottlenecks.0.up.proj.weight"
    ids = torch.randint(0, run.model.vocab_size, (2, run.model.seq_len), generator=torch.Generator().manual_seed(1))
    x = stages[0](ids)
    assert x.shape == (2, run.model.seq_len, run.model.width // 32)
    stages[1](x).sum().backward()
    down = stages[0].bottleneck_down
    assert isinstance(down, BottleneckDown) and down.proj.weight.grad is not None


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["pipeline.activation_bottleneck_ratio=3"], "divide the model width"),
        (["pipeline.activation_bottleneck_ratio=0"], "activation_bottleneck_ratio"),
        (
            ["pipeline.activation_bottleneck_ratio=2", "model.factory=tests.training.factory_example:build"],
            "model.factory",
        ),
    ],
)
def test_bad_ratios_are_config_errors(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.load(None, sets)


def test_ratio_one_is_the_model_without_a_bottleneck() -> None:
    run = gpt_run(ratio=1)
    assert dataclasses.asdict(run.pipeline)["activation_bottleneck_ratio"] == 1
    assert all(s.bottleneck_up is None and s.bottleneck_down is None for s in build_stages(run))
