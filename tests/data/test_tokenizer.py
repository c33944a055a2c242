"""Tokenizers: the trained byte-level BPE round-trips any text, and training is reproducible to the byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.data.inputs import read_documents
from swarm.data.tokenizer import END_OF_TEXT, file_sha256, load_tokenizer, train_bpe
from swarm.errors import ConfigError
from tests.data.corpus import VOCAB_SIZE, corpus_files

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "unicode: héllo wörld ✓ 日本語 🙂\n\ttabs and  double  spaces",
    "",
    "<|endoftext|> is text here, not the special token",
    "\x00\x01 control bytes \x7f",
]


def test_trained_tokenizer_round_trips_text(tmp_path: Path) -> None:
    tok, _ = train_bpe(read_documents(corpus_files()), vocab_size=VOCAB_SIZE, out=tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded.get_vocab_size() == VOCAB_SIZE
    assert loaded.token_to_id(END_OF_TEXT) == 0
    for text in TEXTS:
        ids = loaded.encode(text, add_special_tokens=False).ids
        assert all(0 <= i < VOCAB_SIZE for i in ids)
        assert loaded.decode(ids, skip_special_tokens=False) == text
    source = corpus_files()[0].read_text(encoding="utf-8")
    ids = tok.encode(source).ids
    assert len(ids) < 0.75 * len(source.encode())  # it learned merges: fewer tokens than bytes
    assert tok.decode(ids) == source


def test_training_twice_gives_the_same_file_and_hash(tmp_path: Path) -> None:
    _, first = train_bpe(read_documents(corpus_files()), vocab_size=VOCAB_SIZE, out=tmp_path / "a.json")
    _, second = train_bpe(read_documents(corpus_files()), vocab_size=VOCAB_SIZE, out=tmp_path / "b.json")
    assert first == second == file_sha256(tmp_path / "a.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    _, other = train_bpe(read_documents(corpus_files()), vocab_size=VOCAB_SIZE + 64, out=tmp_path / "c.json")
    assert other != first  # a different setting is a different tokenizer


def test_bad_tokenizer_files_and_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.json"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="vocab-size"):
        train_bpe(["x"], vocab_size=100, out=tmp_path / "small.json")
