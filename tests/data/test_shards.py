"""Token shards: deterministic, per-driver windows from memory-mapped shards; the manifest checks a node runs
before it starts; the data's hashes in the run id."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from swarm.data import ShardedData, ShardSource, bind_data, make_source, verify_manifest
from swarm.data.manifest import Manifest, load_manifest
from swarm.data.prepare import is_validation, prepare_shards
from swarm.data.tokenizer import load_tokenizer
from swarm.errors import ConfigError
from swarm.run.config import RunConfig
from tests.data.corpus import VOCAB_SIZE, corpus_files, shards_run_toml

LENGTH = 33


def run_for(manifest: Path) -> RunConfig:
    return RunConfig.from_dict(__import__("tomllib").loads(shards_run_toml(manifest)))


def test_manifest_records_shards_tokenizer_and_a_validation_split(built_shards: Manifest) -> None:
    m = built_shards
    assert m.dtype == "uint16" and m.vocab_size == VOCAB_SIZE and m.end_of_text_id == 0
    assert len(m.split("train")) >= 3 and m.split("val")  # shard_tokens 20_000 cuts the train split
    assert all(s.tokens == 20_000 for s in m.split("train")[:-1])
    data = json.loads(m.path.read_text())
    documents = data["documents"]
    assert documents["val"] == -(-(documents["train"] + documents["val"]) // 10)  # ceil(n * 0.1)
    tokens = np.concatenate([np.fromfile(m.folder / s.file, dtype="<u2") for s in m.split("train")])
    assert int(tokens.max()) < VOCAB_SIZE
    assert int((tokens == 0).sum()) == documents["train"]  # one end-of-text after every document
    tok = load_tokenizer(m.folder / m.tokenizer_file)
    first_train_doc = corpus_files()[1].read_text(encoding="utf-8")  # document 0 is held out
    end = int(np.argmax(tokens == 0))
    assert tok.decode(tokens[:end].tolist()) == first_train_doc
    assert verify_manifest(m.path).sha256 == m.sha256


def test_preparing_again_gives_identical_bytes(built_shards: Manifest, tmp_path: Path) -> None:
    again = prepare_shards(
        corpus_files(),
        tokenizer_path=built_shards.folder / "tokenizer.json",
        out_dir=tmp_path / "again",
        shard_tokens=20_000,
        val_fraction=0.1,
        progress=False,
    )
    assert again.sha256 == built_shards.sha256
    assert again.shards == built_shards.shards


def test_validation_rule_holds_out_ceil_n_f_documents() -> None:
    from fractions import Fraction

    for n, f in ((1, "0.05"), (20, "0.05"), (21, "0.05"), (100, "0.1"), (7, "0.5"), (10, "0")):
        held = [i for i in range(n) if is_validation(i, Fraction(f))]
        assert len(held) == -(-n * Fraction(f) // 1)
        assert not held or held[0] == 0


def test_same_driver_step_and_microbatch_give_the_same_tokens(shards: Path) -> None:
    cfg = bind_data(run_for(shards))
    a, b = ShardedData(cfg, b"driver-a"), ShardedData(cfg, b"driver-a")
    first = a.microbatch(3, 1)
    assert first.inputs.shape == (8, 32)
    assert np.array_equal(first.inputs.numpy(), b.microbatch(3, 1).inputs.numpy())
    assert np.array_equal(first.targets.numpy()[:, :-1], first.inputs.numpy()[:, 1:])
    assert not np.array_equal(first.inputs.numpy(), a.microbatch(3, 2).inputs.numpy())
    assert not np.array_equal(first.inputs.numpy(), a.microbatch(4, 1).inputs.numpy())


def _windows_read(source: ShardSource, key: bytes, step: int, cfg: RunConfig) -> set[bytes]:
    data = ShardedData(cfg, key, source=source)
    rows = [data.microbatch(step, i).inputs.numpy() for i in range(cfg.batch.target_batch_size // 8)]
    return {row.tobytes() for batch in rows for row in batch}


def test_two_drivers_never_read_the_same_window_in_a_step(shards: Path) -> None:
    cfg = bind_data(run_for(shards))
    source = make_source(cfg)
    assert isinstance(source, ShardSource)
    assert source.num_windows(LENGTH) > 1000
    for step in range(5):
        a = _windows_read(source, b"driver-a", step, cfg)
        b = _windows_read(source, b"driver-b", step, cfg)
        assert len(a) == len(b) == cfg.batch.target_batch_size  # distinct windows within a driver's step, too
        assert not a & b


def test_validation_batches_read_the_held_out_split_in_order(built_shards: Manifest) -> None:
    source = ShardSource(built_shards)
    total = source.num_windows(LENGTH, split="val")
    assert total == built_shards.tokens("val") // LENGTH
    first = source.validation_batch(0, 4, LENGTH)
    val = np.fromfile(built_shards.folder / built_shards.split("val")[0].file, dtype="<u2")
    assert np.array_equal(first.reshape(-1), val[: 4 * LENGTH])
    assert len(source.validation_batch(total - 1, 4, LENGTH)) == 1


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "manifest.json"
    with pytest.raises(ConfigError, match=r"nowhere/manifest\.json.*does not exist.*swarm-data prepare"):
        bind_data(run_for(missing))


def test_truncated_shard_is_a_clear_error(shards: Path) -> None:
    shard = shards.parent / load_manifest(shards).split("train")[1].file
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=rf"{shard.name}.*truncated.*swarm-data prepare"):
        bind_data(run_for(shards))


def test_changed_shard_is_a_clear_error(shards: Path) -> None:
    shard = shards.parent / load_manifest(shards).split("val")[0].file
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"{shard.name}.*SHA-256.*swarm-data prepare"):
        bind_data(run_for(shards))


def test_a_nodes_start_rehashes_only_the_shards_that_changed(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import swarm.data.hash_cache as hash_cache

    hashed: list[str] = []
    real = hash_cache.file_sha256
    monkeypatch.setattr(hash_cache, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    manifest = load_manifest(shards)
    bind_data(run_for(shards))
    assert sorted(hashed) == sorted(s.file for s in manifest.shards)  # the first start hashes every shard
    hashed.clear()
    bind_data(run_for(shards))
    assert hashed == []  # unchanged since: none is read again
    shard = shards.parent / manifest.split("train")[0].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))  # same size, new contents (and a new stat)
    with pytest.raises(ConfigError, match=rf"{shard.name}.*SHA-256"):
        bind_data(run_for(shards))
    assert hashed == [shard.name]
    (shards.parent / ".swarm-verified.json").write_text("{not json")  # a corrupt record is only a cache miss
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    hashed.clear()
    bind_data(run_for(shards))
    assert sorted(hashed) == sorted(s.file for s in manifest.shards)


def test_missing_shard_is_a_clear_error(shards: Path) -> None:
    shard = shards.parent / load_manifest(shards).split("train")[0].file
    shard.unlink()
    with pytest.raises(ConfigError, match=rf"{shard.name}.*missing"):
        bind_data(run_for(shards))


def test_wrong_manifest_hash_in_the_run_config_is_a_clear_error(shards: Path) -> None:
    cfg = run_for(shards)
    pinned = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest_sha256="0" * 64))
    with pytest.raises(ConfigError, match=r"manifest\.json.*data\.manifest_sha256"):
        bind_data(pinned)


def test_a_different_tokenizer_file_is_a_clear_error(shards: Path) -> None:
    tokenizer = shards.parent / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"<|endoftext|>"', '"<|eot|>"'))
    with pytest.raises(ConfigError, match=r"tokenizer\.json.*different tokenizer"):
        bind_data(run_for(shards))


def test_model_vocabulary_smaller_than_the_tokenizers_is_refused(shards: Path) -> None:
    cfg = run_for(shards)
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=256))
    with pytest.raises(ConfigError, match=rf"model.vocab_size.*{VOCAB_SIZE}"):
        bind_data(small)


def test_data_hashes_are_in_the_run_id_and_the_path_is_not(shards: Path, built_shards: Manifest) -> None:
    bound = bind_data(run_for(shards))
    assert bound.data.manifest_sha256 == built_shards.sha256
    assert bound.data.tokenizer_sha256 == built_shards.tokenizer_sha256
    assert bind_data(bound) == bound  # binding twice changes nothing
    assert bound.run_id != run_for(shards).run_id
    elsewhere = bind_data(run_for(built_shards.path))  # the same data in another folder: the same run
    assert elsewhere.data.manifest != bound.data.manifest
    assert elsewhere.run_id == bound.run_id
    bound.check_same_run(elsewhere.to_dict())
    other = dataclasses.replace(bound, data=dataclasses.replace(bound.data, manifest_sha256="1" * 64))
    assert other.run_id != bound.run_id
    with pytest.raises(ConfigError, match=r"data\.manifest_sha256"):
        bound.check_same_run(other)
    reloaded = RunConfig.from_dict(__import__("tomllib").loads(bound.to_toml()))
    assert reloaded == bound and bind_data(reloaded).run_id == bound.run_id


def test_hash_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"data\.manifest_sha256"):
        RunConfig.from_dict({"data": {"source": "shards", "manifest": "m.json", "manifest_sha256": "xyz"}})
    with pytest.raises(ConfigError, match=r"data\.manifest"):
        RunConfig.from_dict({"data": {"source": "shards"}})
