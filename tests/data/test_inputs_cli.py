"""`swarm-data` inputs (text, JSONL, Parquet, a `save_to_disk` folder read with pyarrow) and its commands."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from swarm.cli.data import main
from swarm.data.inputs import read_documents
from swarm.data.manifest import load_manifest
from swarm.errors import ConfigError

DOCS = ["first document\n", "second: ünïcode ✓", "third one, a bit longer " * 5]


def _jsonl(path: Path, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(DOCS)) + "\n")
    return path


def _parquet(path: Path) -> Path:
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), path, row_group_size=2)
    return path


def _saved_dataset(folder: Path) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files, state.json, dataset_info.json."""
    folder.mkdir()
    names = []
    for part, docs in enumerate((DOCS[:2], DOCS[2:])):
        name = f"data-{part:05d}-of-00002.arrow"
        table = pa.table({"text": docs})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return folder


def test_every_input_kind_gives_its_documents_in_order(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text(DOCS[0])
    assert list(read_documents([text])) == DOCS[:1]
    assert list(read_documents([_jsonl(tmp_path / "d.jsonl")])) == DOCS
    assert list(read_documents([_jsonl(tmp_path / "b.jsonl", "body")], field="body")) == DOCS
    assert list(read_documents([_parquet(tmp_path / "d.parquet")])) == DOCS
    assert list(read_documents([_saved_dataset(tmp_path / "saved")])) == DOCS


def test_input_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"d\.jsonl.*line 1.*'body'.*--field"):
        list(read_documents([_jsonl(tmp_path / "d.jsonl")], field="body"))
    with pytest.raises(ConfigError, match=r"d\.parquet.*no column 'body'"):
        list(read_documents([_parquet(tmp_path / "d.parquet")], field="body"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=r"plain.*not a saved dataset"):
        list(read_documents([tmp_path / "plain"]))
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl.*line 1.*not JSON"):
        list(read_documents([tmp_path / "bad.jsonl"]))


def test_tokenizer_prepare_and_verify_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    inputs = [str(_jsonl(tmp_path / "d.jsonl")), str(_parquet(tmp_path / "d.parquet"))]
    inputs.append(str(_saved_dataset(tmp_path / "saved")))
    tok = tmp_path / "tok.json"
    result = runner.invoke(
        main, ["tokenizer", "--vocab-size", "300", "--out", str(tok), "--stdlib", "--max-bytes", "50000", *inputs]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {tok}" in result.output and "sha256" in result.output
    out = tmp_path / "shards"
    result = runner.invoke(
        main,
        ["prepare", "--tokenizer", str(tok), "--out", str(out), "--val-fraction", "0.25", "--no-progress", *inputs],
    )
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out / "manifest.json")
    assert json.loads((out / "manifest.json").read_text())["documents"] == {"train": 6, "val": 3}
    assert manifest.tokenizer_sha256 in result.output and manifest.sha256 in result.output
    assert runner.invoke(main, ["verify", str(out / "manifest.json")]).exit_code == 0
    (out / manifest.split("train")[0].file).write_bytes(b"\x00\x00")
    result = runner.invoke(main, ["verify", str(out / "manifest.json")])
    assert result.exit_code == 1 and "train-00000.bin" in result.output and "truncated" in result.output
    result = runner.invoke(main, ["prepare", "--out", str(out), *inputs])
    assert result.exit_code != 0 and "--tokenizer" in result.output
