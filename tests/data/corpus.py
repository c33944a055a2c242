"""A tiny real corpus for the data tests: a prefix of the stdlib's sources, a 512-token BPE, and its shards."""

from __future__ import annotations

from pathlib import Path

from swarm.data.inputs import read_documents
from swarm.data.manifest import Manifest
from swarm.data.prepare import prepare_shards
from swarm.data.stdlib import stdlib_files
from swarm.data.tokenizer import train_bpe

VOCAB_SIZE = 512
CORPUS_BYTES = 400_000


def corpus_files() -> list[Path]:
    return stdlib_files(CORPUS_BYTES)


def make_shards(folder: Path, *, shard_tokens: int = 20_000, val_fraction: float = 0.1) -> Manifest:
    """Train the tokenizer on the corpus and prepare its shards into ``folder`` (several train shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_bpe(read_documents(corpus_files()), vocab_size=VOCAB_SIZE, out=folder / "tok.json")
    return prepare_shards(
        corpus_files(),
        tokenizer_path=folder / "tok.json",
        out_dir=folder / "shards",
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        progress=False,
    )


def shards_run_toml(manifest: Path, *, name: str = "shards-test") -> str:
    """A small tiny-GPT run on the shards of ``manifest``."""
    return f"""name = "{name}"
seed = 0

[model]
vocab_size = {VOCAB_SIZE}
d_model = 32
num_heads = 2
num_blocks = 2
seq_len = 32

[pipeline]
num_stages = 2

[batch]
target_batch_size = 32
microbatch_size = 8

[data]
source = "shards"
manifest = "{manifest}"
"""
