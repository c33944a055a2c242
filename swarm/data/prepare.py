"""`swarm-data prepare`: tokenize inputs into memory-mappable token shards plus ``manifest.json``.

Every document is encoded and followed by the end-of-text token. Document ``i`` (counting from 0, over all inputs
in order) goes to the held-out validation split when ``ceil((i + 1) * f) > ceil(i * f)`` for ``f = val_fraction``:
the first document, then one in every ``1/f``, exactly ``ceil(n * f)`` documents of ``n``. The rest is the train
split. Each split is cut into shards of at most ``shard_tokens`` tokens, stored as ``uint16`` when every id fits
(vocabulary <= 65536), else ``uint32``. The same inputs, tokenizer and settings give byte-identical shards and
manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from swarm.data.inputs import DEFAULT_FIELD, read_documents
from swarm.data.manifest import FORMAT, MANIFEST_NAME, VERSION, Manifest, ShardInfo, load_manifest
from swarm.data.tokenizer import encode_batches, end_of_text_id, file_sha256, load_tokenizer
from swarm.errors import ConfigError

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB as uint16
TOKENIZER_NAME = "tokenizer.json"


class _SplitWriter:
    """Appends token ids to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` tokens, hashing as it writes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype[Any], shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[ShardInfo] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._tokens = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                self._file = open(self.folder / f"{self.split}-{len(self.shards):05d}.bin", "wb")  # noqa: SIM115 (closed in close())
            part = ids[: self.shard_tokens - self._tokens]
            data = part.astype(self.dtype).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._tokens += len(part)
            ids = ids[len(part) :]
            if self._tokens == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is None:
            return
        name = Path(self._file.name).name
        self._file.close()
        self.shards.append(ShardInfo(file=name, split=self.split, tokens=self._tokens, sha256=self._hash.hexdigest()))
        self._file, self._hash, self._tokens = None, hashlib.sha256(), 0


def is_validation(index: int, fraction: Fraction) -> bool:
    """Whether document ``index`` is held out (see the module doc)."""
    return math.ceil((index + 1) * fraction) > math.ceil(index * fraction)


def prepare_shards(
    inputs: Iterable[str | Path],
    *,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    field: str = DEFAULT_FIELD,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> Manifest:
    """Tokenize ``inputs`` into ``out_dir`` (created; its old shards and manifest replaced) and return the manifest.

    The tokenizer file is copied into ``out_dir`` as ``tokenizer.json``, so the folder is all a node needs.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be positive, got {shard_tokens}")
    tok = load_tokenizer(tokenizer_path)
    eot = end_of_text_id(tok)
    vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
    dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("train-*.bin"), *folder.glob("val-*.bin"), folder / MANIFEST_NAME]:
        old.unlink(missing_ok=True)
    if Path(tokenizer_path).resolve() != (folder / TOKENIZER_NAME).resolve():
        shutil.copyfile(tokenizer_path, folder / TOKENIZER_NAME)
    writers = {split: _SplitWriter(folder, split, dtype, shard_tokens) for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    fraction = Fraction(str(val_fraction))
    from tqdm import tqdm

    with tqdm(desc="tokenizing", unit=" docs", disable=not progress) as bar:
        for batch in encode_batches(tok, read_documents(inputs, field=field)):
            for ids in batch:
                split = "val" if is_validation(counts["train"] + counts["val"], fraction) else "train"
                counts[split] += 1
                writers[split].write(np.asarray([*ids, eot], dtype=np.int64))
            bar.update(len(batch))
    for writer in writers.values():
        writer.close()
    if not writers["train"].shards:
        raise ConfigError(f"the inputs hold {sum(counts.values())} document(s): too few for a train split")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "end_of_text_id": eot,
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": file_sha256(folder / TOKENIZER_NAME)},
        "val_fraction": float(val_fraction),
        "documents": counts,
        "shards": [vars(s) for w in writers.values() for s in w.shards],
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return load_manifest(folder / MANIFEST_NAME)
