"""A real corpus on every machine: the Python standard library's own source files.

`stdlib_files` lists the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (skipping ``site-packages``,
``dist-packages`` and test folders), sorted by their path relative to that folder, and keeps them in that order
until ``max_bytes`` would be exceeded. `build_stdlib_shards` trains a byte-level BPE on them and prepares token
shards, in a cache folder: ``$SWARM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/swarm``, else ``~/.cache/swarm``)
``/stdlib-<key>``, where the key hashes the Python version, the stdlib folder and the settings. A run with
``data.source = "stdlib"`` builds it the first time (`swarm-data prepare --stdlib` builds it explicitly); later
runs reuse it. Machines with the same Python build the same bytes, so their runs share one run id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from swarm.data.inputs import read_documents
from swarm.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from swarm.data.prepare import TOKENIZER_NAME, prepare_shards
from swarm.data.tokenizer import train_bpe
from swarm.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 << 20
STDLIB_VAL_FRACTION = 0.05
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FORMAT_KEY = "stdlib-corpus-v1"


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """The stdlib's ``*.py`` files, sorted by relative path, the longest prefix of at most ``max_bytes`` bytes."""
    root = stdlib_folder()
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _SKIPPED_DIRS.isdisjoint(relative.parts[:-1]) and path.is_file():
            found.append((relative.as_posix(), path))
    files, total = [], 0
    for _, path in sorted(found):
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise ConfigError(f"no Python source files under {str(root)!r} fit in {max_bytes} bytes")
    return files


def cache_root() -> Path:
    """``$SWARM_CACHE_DIR``, else ``$XDG_CACHE_HOME/swarm``, else ``~/.cache/swarm``."""
    if os.environ.get("SWARM_CACHE_DIR"):
        return Path(os.environ["SWARM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "swarm"


def stdlib_cache_dir(*, vocab_size: int, max_bytes: int) -> Path:
    """The cache folder of the stdlib shards built with these settings on this Python."""
    key = json.dumps(
        [_FORMAT_KEY, sys.version, str(stdlib_folder()), vocab_size, max_bytes, STDLIB_VAL_FRACTION]
    ).encode()
    return cache_root() / f"stdlib-{hashlib.sha256(key).hexdigest()[:16]}"


def build_stdlib_shards(*, vocab_size: int, max_bytes: int, progress: bool = False) -> Manifest:
    """The stdlib shards of these settings: read from the cache, or built into it (atomically: a folder is renamed
    into place when complete, so concurrent builders never see half a folder)."""
    folder = stdlib_cache_dir(vocab_size=vocab_size, max_bytes=max_bytes)
    if (folder / MANIFEST_NAME).is_file():
        return load_manifest(folder / MANIFEST_NAME)
    files = stdlib_files(max_bytes)
    log.info("building stdlib token shards from %d files into %s", len(files), folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=folder.name + ".tmp-") as tmp:
        work = Path(tmp) / "shards"
        work.mkdir()
        train_bpe(read_documents(files), vocab_size=vocab_size, out=work / TOKENIZER_NAME)
        prepare_shards(
            files,
            tokenizer_path=work / TOKENIZER_NAME,
            out_dir=work,
            val_fraction=STDLIB_VAL_FRACTION,
            progress=progress,
        )
        try:
            work.rename(folder)
        except OSError:  # another process finished first: use its folder
            if not (folder / MANIFEST_NAME).is_file():
                raise
    return load_manifest(folder / MANIFEST_NAME)
