"""RunConfig: TOML loading, validation naming the field, canonical hash, join check."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from swarm.compression import CodecPolicy
from swarm.run.config import DEFAULT_PRESET, RunConfig
from swarm.errors import ConfigError
from swarm.training.messages import PEERS_SCHEMA
from swarm.training.training_config import TrainingConfig


def test_default_run_loads_and_has_a_stable_run_id() -> None:
    cfg = RunConfig.from_toml()
    again = RunConfig.from_toml(DEFAULT_PRESET)
    assert cfg == again
    assert cfg.run_id == again.run_id and cfg.run_id.startswith("tiny-gpt-")
    assert cfg.pipeline.num_stages == 2


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = RunConfig.from_toml()
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.from_toml(path) == cfg


def test_any_change_changes_the_run_id() -> None:
    cfg = RunConfig.from_toml()
    other = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=cfg.optimizer.lr * 2))
    assert other.run_id != cfg.run_id


def test_join_check_names_the_differing_field() -> None:
    cfg = RunConfig.from_toml()
    other = dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, microbatch_size=4))
    cfg.check_same_run(cfg.to_dict())
    with pytest.raises(ConfigError, match=r"batch\.microbatch_size"):
        cfg.check_same_run(other)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[model]\nd_model = 65\nnum_heads = 4\n", "model.d_model"),
        ("[batch]\ntarget_batch_size = 4\nmicrobatch_size = 8\n", "batch.microbatch_size"),
        ("[optimizer]\nname = 'lion'\n", "optimizer.name"),
        ("[codecs]\nactivations = 'zip'\n", "codecs.activations"),
        ("[pipeline]\nnum_stages = 9\n", "pipeline.num_stages"),
        ("[pipeline]\nretie_every_steps = -1\n", "pipeline.retie_every_steps"),
        ("[model]\nfrobnicate = 1\n", "frobnicate"),
        ("[data]\nsource = 'text'\n", "data.path"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunConfig.from_toml(path)


def test_unreadable_or_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        RunConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(bad)


def test_codec_parameters_reach_the_policy(tmp_path: Path) -> None:
    defaults = RunConfig.from_toml().codecs.policy()
    assert (defaults.topk_fraction, defaults.blockwise8_blocksize) == (
        CodecPolicy().topk_fraction,
        CodecPolicy().blockwise8_blocksize,
    )
    path = tmp_path / "run.toml"
    path.write_text("[codecs]\nallreduce = 'topk'\ntopk_fraction = 0.25\nblockwise8_blocksize = 256\n")
    cfg = RunConfig.from_toml(path)
    policy = cfg.codecs.policy()
    assert (policy.topk_fraction, policy.blockwise8_blocksize) == (0.25, 256)
    assert policy.codec_for("allreduce", torch.zeros(4096)).fraction == 0.25
    codecs = dataclasses.replace(cfg.codecs, topk_fraction=0.5)
    assert dataclasses.replace(cfg, codecs=codecs).run_id != cfg.run_id  # peers must agree on it


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[codecs]\ntopk_fraction = 0\n", "codecs.topk_fraction"),
        ("[codecs]\ntopk_fraction = 1.5\n", "codecs.topk_fraction"),
        ("[codecs]\ntopk_fraction = 'half'\n", "codecs.topk_fraction"),
        ("[codecs]\nblockwise8_blocksize = 1000\n", "codecs.blockwise8_blocksize"),
        ("[codecs]\nblockwise8_blocksize = 4096.0\n", "codecs.blockwise8_blocksize"),
    ],
)
def test_bad_codec_parameters_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunConfig.from_toml(path)


def test_record_period_is_bounded_by_the_peer_records_schema() -> None:
    """Peer records live 2 x record_period_s, and every node refuses ones that live longer than PEERS_SCHEMA's
    maximum: a longer period would make a node vanish from the view between two of its records."""
    run = RunConfig.from_toml()
    TrainingConfig(run=run, record_period_s=60.0)
    assert PEERS_SCHEMA.max_ttl_s >= 2 * 60.0 + 60  # the progress record's lifetime at the longest period
    with pytest.raises(ConfigError, match="record_period_s"):
        TrainingConfig(run=run, record_period_s=61.0)
