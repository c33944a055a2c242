"""The manifest of a folder of token shards, and the check a node runs on it before it starts.

``manifest.json`` (written by `swarm-data prepare`, see docs/training.md) holds no absolute path and no time, so
preparing the same inputs with the same tokenizer and settings gives a byte-identical manifest; its SHA-256 is
bound into the run config (``data.manifest_sha256``) and so into the run id::

    {"format": "swarm-token-shards", "version": 1, "dtype": "uint16", "vocab_size": 8192, "end_of_text_id": 0,
     "tokenizer": {"file": "tokenizer.json", "sha256": "..."}, "val_fraction": 0.05,
     "documents": {"train": 950, "val": 50},
     "shards": [{"file": "train-00000.bin", "split": "train", "tokens": 1048576, "sha256": "..."}, ...]}

A shard is the raw little-endian token ids (``dtype``), memory-mapped when read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarm.data.hash_cache import HashCache
from swarm.data.tokenizer import file_sha256
from swarm.errors import ConfigError

MANIFEST_NAME = "manifest.json"
FORMAT = "swarm-token-shards"
VERSION = 1
DTYPES = ("uint16", "uint32")
SPLITS = ("train", "val")
FIX = "rebuild the folder with `swarm-data prepare` or copy the run's shard folder again"


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """One shard file: its name in the folder, its split, its length in tokens and its SHA-256."""

    file: str
    split: str
    tokens: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A parsed ``manifest.json``; ``path`` is where it was read, ``sha256`` the hash of its bytes."""

    path: Path
    sha256: str
    dtype: str
    vocab_size: int
    end_of_text_id: int
    tokenizer_file: str
    tokenizer_sha256: str
    val_fraction: float
    shards: tuple[ShardInfo, ...]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def split(self, name: str) -> tuple[ShardInfo, ...]:
        return tuple(s for s in self.shards if s.split == name)

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.split(split))


def _get(data: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"manifest {str(path)!r}: {key!r} must be {kind.__name__}, got {value!r}; {FIX}")
    return value


def _name(value: str, path: Path) -> str:
    if not value or Path(value).name != value:
        raise ConfigError(f"manifest {str(path)!r}: file name {value!r} must be a plain name in the folder; {FIX}")
    return value


def load_manifest(path: str | Path) -> Manifest:
    """Parse a manifest (ConfigError naming the file when it is missing or malformed). Checks no shard."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"token-shard manifest {str(path)!r} does not exist: build it with `swarm-data prepare --tokenizer "
            f"TOKENIZER --out {str(path.parent)!r} INPUTS...` (or `swarm-data prepare --stdlib`), or copy the run's "
            "shard folder there"
        )
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"manifest {str(path)!r} is not JSON: {e}; {FIX}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ConfigError(f"{str(path)!r} is not a {FORMAT} manifest of version {VERSION}; {FIX}")
    dtype = _get(data, "dtype", str, path)
    if dtype not in DTYPES:
        raise ConfigError(f"manifest {str(path)!r}: dtype must be one of {DTYPES}, got {dtype!r}; {FIX}")
    tokenizer = _get(data, "tokenizer", dict, path)
    shards = []
    for entry in _get(data, "shards", list, path):
        if not isinstance(entry, dict) or entry.get("split") not in SPLITS:
            raise ConfigError(f"manifest {str(path)!r}: malformed shard entry {entry!r}; {FIX}")
        shards.append(
            ShardInfo(
                file=_name(_get(entry, "file", str, path), path),
                split=entry["split"],
                tokens=_get(entry, "tokens", int, path),
                sha256=_get(entry, "sha256", str, path),
            )
        )
    return Manifest(
        path=path,
        sha256=file_sha256(path),
        dtype=dtype,
        vocab_size=_get(data, "vocab_size", int, path),
        end_of_text_id=_get(data, "end_of_text_id", int, path),
        tokenizer_file=_name(_get(tokenizer, "file", str, path), path),
        tokenizer_sha256=_get(tokenizer, "sha256", str, path),
        val_fraction=_get(data, "val_fraction", float, path),
        shards=tuple(shards),
    )


def verify_manifest(
    path: str | Path,
    *,
    expected_sha256: str = "",
    expected_tokenizer_sha256: str = "",
    check_hashes: bool = True,
    use_cache: bool = False,
) -> Manifest:
    """The manifest at ``path``, after checking that it is the one the run names (``expected_sha256``, when given),
    that its tokenizer file matches, and that every shard exists with the recorded size and SHA-256 (with
    ``use_cache``, a shard unchanged since it was last hashed here is not read again: `swarm.data.hash_cache`).

    Every failure is a ConfigError that names the file and says how to fix it: a node runs this before it listens.
    """
    manifest = load_manifest(path)
    if expected_sha256 and manifest.sha256 != expected_sha256:
        raise ConfigError(
            f"manifest {str(manifest.path)!r} has SHA-256 {manifest.sha256[:16]}..., the run config names "
            f"{expected_sha256[:16]}... (data.manifest_sha256): this is not the run's data; copy the run's shard "
            "folder here or start with the run config that names this manifest"
        )
    tokenizer_path = manifest.folder / manifest.tokenizer_file
    if not tokenizer_path.is_file():
        raise ConfigError(f"tokenizer {str(tokenizer_path)!r} named by {str(manifest.path)!r} is missing; {FIX}")
    for expected, label in ((manifest.tokenizer_sha256, "the manifest"), (expected_tokenizer_sha256, "the run")):
        actual = file_sha256(tokenizer_path) if expected else ""
        if expected and actual != expected:
            raise ConfigError(
                f"tokenizer {str(tokenizer_path)!r} has SHA-256 {actual[:16]}..., {label} expects {expected[:16]}...: "
                f"a different tokenizer file; {FIX}"
            )
    if not manifest.split("train"):
        raise ConfigError(f"manifest {str(manifest.path)!r} lists no train shard; {FIX}")
    itemsize = np.dtype(manifest.dtype).itemsize
    cache = HashCache(manifest.folder) if use_cache and check_hashes else None
    try:
        for shard in manifest.shards:
            _check_shard(manifest.folder / shard.file, shard, itemsize, check_hashes, cache)
    finally:
        if cache is not None:
            cache.save()
    return manifest


def _check_shard(path: Path, shard: ShardInfo, itemsize: int, check_hash: bool, cache: HashCache | None) -> None:
    if not path.is_file():
        raise ConfigError(f"token shard {str(path)!r} is missing; {FIX}")
    size = path.stat().st_size
    if size != shard.tokens * itemsize:
        raise ConfigError(
            f"token shard {str(path)!r} has {size} bytes, the manifest records {shard.tokens} tokens "
            f"({shard.tokens * itemsize} bytes): the file is truncated or changed; {FIX}"
        )
    if check_hash and (cache.sha256(path) if cache is not None else file_sha256(path)) != shard.sha256:
        raise ConfigError(
            f"token shard {str(path)!r} does not match the SHA-256 in its manifest: the file is corrupt or changed; "
            f"{FIX}"
        )
