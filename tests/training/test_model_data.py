"""The tiny GPT, its stage split, the Markov source and shards, and the single-process loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from swarm.run.config import RunConfig
from swarm.errors import ConfigError
from swarm.data import MarkovSource, ShardedData
from swarm.model import InputSpec, PipelineModel, StageInputError, build_stages, stage_block_ranges
from swarm.training.local_train import train_local


@pytest.fixture
def cfg() -> RunConfig:
    return RunConfig.from_toml()


def test_stages_chain_to_the_same_function_on_every_build(cfg: RunConfig) -> None:
    a, b = PipelineModel(build_stages(cfg)), PipelineModel(build_stages(cfg))
    ids = torch.randint(0, cfg.model.vocab_size, (3, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    out = a(ids)
    assert out.shape == (3, cfg.model.seq_len, cfg.model.vocab_size)
    assert torch.equal(out, b(ids))
    assert a.stages[0].is_first and a.stages[-1].is_last and not a.stages[0].is_last


def test_single_stage_model_ties_head_to_embedding(cfg: RunConfig) -> None:
    one = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, num_stages=1))
    (stage,) = build_stages(one)
    body = stage.body
    assert body[0].tokens.weight is body[-1].weight


def test_block_ranges_are_contiguous_and_cover_all_blocks() -> None:
    ranges = stage_block_ranges(5, 3)
    assert [list(r) for r in ranges] == [[0, 1], [2, 3], [4]]


def test_input_spec_rejects_wrong_shape_dtype_and_ids() -> None:
    spec = InputSpec(dtype=torch.int64, tail_shape=(4,), max_value=10)
    spec.check(torch.zeros(2, 4, dtype=torch.int64), stage=0, max_batch=8)
    with pytest.raises(StageInputError, match="int64"):
        spec.check(torch.zeros(2, 4), stage=0, max_batch=8)
    with pytest.raises(StageInputError, match="shape"):
        spec.check(torch.zeros(2, 5, dtype=torch.int64), stage=0, max_batch=8)
    with pytest.raises(StageInputError, match="shape"):
        spec.check(torch.zeros(9, 4, dtype=torch.int64), stage=0, max_batch=8)
    with pytest.raises(StageInputError, match="range"):
        spec.check(torch.full((2, 4), 10, dtype=torch.int64), stage=0, max_batch=8)
    hidden = InputSpec(dtype=torch.float32, tail_shape=(4, 3))
    with pytest.raises(StageInputError, match="non-finite"):
        hidden.check(torch.full((1, 4, 3), float("nan")), stage=1, max_batch=8)


def test_markov_floor_matches_the_empirical_loss_of_the_true_chain() -> None:
    src = MarkovSource(16, concentration=0.1, seed=3)
    x = src.sample(np.random.default_rng(0), 400, 50)
    nll = -np.log(src.transitions[x[:, :-1], x[:, 1:]]).mean()
    assert abs(nll - src.loss_floor) < 0.05
    assert src.loss_floor < np.log(16)


def test_shards_are_deterministic_and_disjoint(cfg: RunConfig) -> None:
    a, b = ShardedData(cfg, b"peer-a"), ShardedData(cfg, b"peer-b")
    assert torch.equal(a.microbatch(3, 1).inputs, a.microbatch(3, 1).inputs)
    assert not torch.equal(a.microbatch(3, 1).inputs, b.microbatch(3, 1).inputs)
    assert not torch.equal(a.microbatch(3, 1).inputs, a.microbatch(3, 2).inputs)
    mb = a.microbatch(0, 0)
    assert torch.equal(mb.inputs[:, 1:], mb.targets[:, :-1])


def test_local_loop_learns_toward_the_floor(cfg: RunConfig) -> None:
    _, result = train_local(cfg, steps=12)
    assert result.samples == 12 * cfg.batch.target_batch_size
    assert result.losses[-1] < result.losses[0] - 0.5
    assert result.loss_floor is not None and result.losses[-1] > result.loss_floor - 0.1


def test_local_loop_evaluates_at_the_swarms_steps_on_the_held_out_batches(cfg: RunConfig) -> None:
    run = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every_steps=3, batches=2))
    model, result = train_local(run, steps=7)
    assert sorted(result.eval_losses) == [0, 3, 6, 7]  # every 3 steps, and the final weights
    assert result.eval_losses[7] < result.eval_losses[0] - 0.3
    data = ShardedData(run, b"anyone")  # the held-out microbatches do not depend on who draws them
    with torch.no_grad():
        losses = [
            (float(model.loss(b.inputs, b.targets)), b.num_samples)
            for b in (data.eval_microbatch(7, i) for i in range(2))
        ]
    assert result.eval_losses[7] == pytest.approx(sum(x * n for x, n in losses) / sum(n for _, n in losses), rel=1e-6)
    _, plain = train_local(cfg, steps=2)
    assert cfg.eval.every_steps == 0 and plain.eval_losses == {}


def test_model_factory_replaces_the_gpt(cfg: RunConfig) -> None:
    run = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, factory="tests.training.factory_example:make"))
    stages = build_stages(run)
    assert [type(s.body).__name__ for s in stages] == ["Sequential", "Linear"]
    assert torch.equal(build_stages(run)[1].body.weight, stages[1].body.weight)  # seeded: identical on every node
    _, result = train_local(run, steps=3)
    assert len(result.losses) == 3 and result.loss_floor is not None
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, factory="tests.training.nowhere:make"))
    with pytest.raises(ConfigError, match=r"model\.factory"):
        build_stages(bad)


class CountingSource:
    """A DataSource: token t of every sample is t mod 5 (round trip through ShardedData)."""

    loss_floor = 0.0

    def sample(self, rng: np.random.Generator, num_samples: int, length: int) -> np.ndarray:
        return np.tile(np.arange(length) % 5, (num_samples, 1))


def test_a_custom_data_source_round_trips_through_shards(cfg: RunConfig) -> None:
    data = ShardedData(cfg, b"k", source=CountingSource())
    mb = data.microbatch(0, 0, 3)
    assert mb.inputs.shape == (3, cfg.model.seq_len) and mb.inputs.dtype == torch.int64
    assert mb.inputs[0, :6].tolist() == [0, 1, 2, 3, 4, 0] and mb.targets[0, :5].tolist() == [1, 2, 3, 4, 0]
    assert data.loss_floor == 0.0
