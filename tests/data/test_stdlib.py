"""The stdlib corpus: sorted, bounded files; the gpt_stdlib preset builds its shards once into the cache."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from swarm.cli.data import main
from swarm.data import bind_data, manifest_path
from swarm.data.stdlib import stdlib_files
from swarm.run.config import RunConfig, preset_names

SMALL = ("model.vocab_size=300", "data.stdlib_max_bytes=60000")


def test_stdlib_files_are_sorted_bounded_sources() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(100_000)
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative) and all(r.endswith(".py") for r in relative)
    assert sum(f.stat().st_size for f in files) <= 100_000
    assert not any("site-packages" in r or "/test/" in r for r in relative)
    assert stdlib_files(200_000)[: len(files)] == files  # a larger bound extends the same prefix


def test_gpt_stdlib_preset_builds_its_shards_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    assert "gpt_stdlib" in preset_names() and RunConfig.load().data.source == "markov"  # tiny_gpt stays the default
    cfg = RunConfig.load("gpt_stdlib", SMALL)
    assert cfg.data.source == "stdlib" and cfg.model.factory == ""
    result = CliRunner().invoke(
        main, ["prepare", "--stdlib", "--no-progress", *[a for s in SMALL for a in ("--set", s)]]
    )
    assert result.exit_code == 0, result.output
    manifest = manifest_path(cfg)
    assert manifest.is_relative_to(tmp_path / "cache") and manifest.is_file()
    built = manifest.stat().st_mtime_ns
    bound = bind_data(cfg)
    assert manifest.stat().st_mtime_ns == built  # reused, not rebuilt
    assert f"run id {bound.run_id}" in result.output
    assert bound.data.manifest_sha256 and bound.data.tokenizer_sha256
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert bind_data(cfg).run_id == bound.run_id  # built again from scratch: the same bytes, the same run
