"""Tokenizers (the `tokenizers` library): load a ``tokenizer.json`` by path, or train a byte-level BPE on files.

A trained tokenizer is deterministic: the same files (in the same order) and the same settings give a byte-identical
``tokenizer.json``, so its SHA-256 (`file_sha256`) names it; that hash goes into the shard manifest and the run id.
Id 0 is the end-of-text token ``<|endoftext|>``, appended after every document when shards are prepared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from swarm.errors import ConfigError

END_OF_TEXT = "<|endoftext|>"
_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex of a file's bytes, read in chunks (ConfigError naming the file if it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as e:
        raise ConfigError(f"cannot read {str(path)!r}: {e}") from None
    return digest.hexdigest()


def _library() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("tokenizers are not installed: pip install 'swarm[data]'") from None
    return tokenizers


def load_tokenizer(path: str | Path) -> Any:
    """The `tokenizers.Tokenizer` saved in ``path`` (a ``tokenizer.json``); ConfigError naming the file if not."""
    tokenizers = _library()
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception subclasses for unreadable or malformed files
        raise ConfigError(f"cannot load tokenizer {str(path)!r}: {e}") from None


def train_bpe(texts: Iterable[str], *, vocab_size: int, out: str | Path, min_frequency: int = 2) -> tuple[Any, str]:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on the documents ``texts``, save it to ``out``.

    Returns the tokenizer and the SHA-256 of the saved file. Every byte is in the initial alphabet, so any text
    encodes and decodes back exactly.
    """
    tokenizers = _library()
    if vocab_size < 257 + 1:
        raise ConfigError(f"--vocab-size must be at least 258 (256 bytes, end-of-text, one merge), got {vocab_size}")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return tok, file_sha256(out)


def end_of_text_id(tok: Any) -> int:
    """The id of ``<|endoftext|>`` (ConfigError if the tokenizer lacks it)."""
    token_id = tok.token_to_id(END_OF_TEXT)
    if token_id is None:
        raise ConfigError(f"the tokenizer has no {END_OF_TEXT} token; train one with `swarm-data tokenizer`")
    return int(token_id)


def encode_batches(tok: Any, texts: Iterable[str], batch_size: int = 256) -> Iterator[list[list[int]]]:
    """Token ids of ``texts``, in batches (``encode_batch`` runs on the library's threads)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]
            batch = []
    if batch:
        yield [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]
