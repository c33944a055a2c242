"""Binding a run to its data before a node starts: the check `swarm-node start` and `swarm-node local` run first.

`bind_data` returns the run config with ``data.manifest_sha256`` and ``data.tokenizer_sha256`` filled in from the
data on this machine (building the stdlib shards into their cache the first time), after `verify_manifest` checked
every file. Every node of a run therefore agrees on the data's hashes through the run id, and a node whose
manifest, tokenizer or shard is missing, truncated or different refuses to start with an error naming the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from swarm.data.manifest import MANIFEST_NAME, verify_manifest
from swarm.data.stdlib import build_stdlib_shards, stdlib_cache_dir
from swarm.errors import ConfigError
from swarm.run.config import RunConfig

SHARD_SOURCES = ("shards", "stdlib")


def manifest_path(cfg: RunConfig) -> Path:
    """The manifest a ``shards`` or ``stdlib`` run reads on this machine."""
    if cfg.data.source == "stdlib":
        folder = stdlib_cache_dir(vocab_size=cfg.model.vocab_size, max_bytes=cfg.data.stdlib_max_bytes)
        return folder / MANIFEST_NAME
    if cfg.data.source == "shards":
        return Path(cfg.data.manifest).expanduser()
    raise ConfigError(f"data.source {cfg.data.source!r} has no manifest")


def bind_data(cfg: RunConfig, *, progress: bool = False) -> RunConfig:
    """``cfg`` with its data's hashes filled in and checked (a no-op for ``markov`` and ``text``)."""
    if cfg.data.source not in SHARD_SOURCES:
        return cfg
    if cfg.data.source == "stdlib":
        build_stdlib_shards(vocab_size=cfg.model.vocab_size, max_bytes=cfg.data.stdlib_max_bytes, progress=progress)
    manifest = verify_manifest(
        manifest_path(cfg),
        expected_sha256=cfg.data.manifest_sha256,
        expected_tokenizer_sha256=cfg.data.tokenizer_sha256,
        use_cache=True,  # a node's start re-reads only shards that changed since they were last hashed here
    )
    if not cfg.model.factory and manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary ({manifest.vocab_size}) of "
            f"the tokenizer of {str(manifest.path)!r}: set model.vocab_size = {manifest.vocab_size}"
        )
    data = dataclasses.replace(cfg.data, manifest_sha256=manifest.sha256, tokenizer_sha256=manifest.tokenizer_sha256)
    return dataclasses.replace(cfg, data=data)
