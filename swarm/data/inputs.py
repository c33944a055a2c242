"""The documents of `swarm-data` inputs: text files, JSONL, Parquet files, and `datasets` ``save_to_disk`` folders.

- a text file (any other suffix) is one document, read as UTF-8 (undecodable bytes replaced);
- ``.jsonl`` / ``.json``: one JSON object per line, the document is its ``field`` (default ``text``);
- ``.parquet``: the column ``field`` of every row, read batch by batch with pyarrow;
- a folder holding ``state.json`` (what `datasets.Dataset.save_to_disk` writes): its ``data-*.arrow`` files, in
  the order ``state.json`` lists them, read as Arrow IPC streams with pyarrow (the `datasets` package is not needed).

Empty documents are skipped. Every error names the input file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from swarm.errors import ConfigError

DEFAULT_FIELD = "text"


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ConfigError("pyarrow is not installed: pip install 'swarm[data]'") from None
    return pyarrow


def input_kind(path: Path) -> str:
    """``dataset``, ``jsonl``, ``parquet`` or ``text``."""
    if path.is_dir():
        return "dataset"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def read_documents(paths: Iterable[str | Path], *, field: str = DEFAULT_FIELD) -> Iterator[str]:
    """Every non-empty document of every input, in order."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ConfigError(f"input {str(path)!r} does not exist")
        kind = input_kind(path)
        if kind == "dataset":
            docs = _dataset_documents(path, field)
        elif kind == "jsonl":
            docs = _jsonl_documents(path, field)
        elif kind == "parquet":
            docs = _parquet_documents(path, field)
        else:
            docs = iter([path.read_bytes().decode("utf-8", errors="replace")])
        yield from (doc for doc in docs if doc)


def _field_text(value: Any, path: Path, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{str(path)!r} {where}: field {field!r} is {type(value).__name__}, not text")
    return value


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{str(path)!r} line {number} is not JSON: {e}") from None
            if not isinstance(record, dict) or field not in record:
                raise ConfigError(f"{str(path)!r} line {number} has no field {field!r} (choose one with --field)")
            yield _field_text(record[field], path, f"line {number}", field)


def _column_texts(table_or_batch: Any, path: Path, field: str) -> Iterator[str]:
    if field not in table_or_batch.schema.names:
        raise ConfigError(
            f"{str(path)!r} has no column {field!r} (columns: {table_or_batch.schema.names}; choose with --field)"
        )
    for value in table_or_batch.column(field).to_pylist():
        yield _field_text(value, path, "row", field)


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    pa = _pyarrow()
    try:
        parquet = pa.parquet.ParquetFile(str(path))
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"cannot read Parquet file {str(path)!r}: {e}") from None
    if field not in parquet.schema_arrow.names:
        raise ConfigError(
            f"{str(path)!r} has no column {field!r} (columns: {parquet.schema_arrow.names}; choose with --field)"
        )
    for batch in parquet.iter_batches(columns=[field]):
        yield from _column_texts(batch, path, field)


def _dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder, in ``state.json``'s order (else sorted by name)."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise ConfigError(f"{str(folder)!r} is a folder but not a saved dataset (no state.json in it)")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {str(state_path)!r}: {e}") from None
    listed = [entry.get("filename") for entry in state.get("_data_files", []) if isinstance(entry, dict)]
    files = [folder / name for name in listed if isinstance(name, str)] or sorted(folder.glob("data-*.arrow"))
    if not files:
        raise ConfigError(f"saved dataset {str(folder)!r} has no data-*.arrow files")
    return files


def _dataset_documents(folder: Path, field: str) -> Iterator[str]:
    pa = _pyarrow()
    for path in _dataset_files(folder):
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"cannot read Arrow file {str(path)!r}: {e}") from None
        for batch in reader:
            yield from _column_texts(batch, path, field)
