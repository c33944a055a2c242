"""A folder's record of the shard hashes it already checked, so a node's start does not re-read every shard.

``.swarm-verified.json`` beside the manifest maps a shard's file name to the ``(size, mtime_ns, inode)`` it had
when its SHA-256 was computed, and that hash. A shard whose stat still matches is taken as verified; any change
to the file (a rewrite, a copy, a truncation) changes its stat and it is hashed again. The record is a cache:
a folder where it cannot be written just hashes every time, and a corrupt record is ignored and rewritten.
It trusts the local file system's metadata: it guards against damaged or swapped files, not against a local user
who rewrites a shard and then resets its modification time (`swarm-data verify` always hashes everything).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from swarm.data.tokenizer import file_sha256

log = logging.getLogger(__name__)

CACHE_NAME = ".swarm-verified.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class HashCache:
    """The verified hashes of one folder's shards (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / CACHE_NAME
        self._entries: dict[str, Any] = {}
        self._changed = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self._entries = data
        except (OSError, ValueError):
            pass  # none yet, unreadable or corrupt: hash everything and rewrite it

    def sha256(self, path: Path) -> str:
        """The SHA-256 of ``path``: from the record when its stat is unchanged, else computed (and recorded)."""
        stamp = _stamp(path)
        entry = self._entries.get(path.name)
        if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
            return str(entry["sha256"])
        digest = file_sha256(path)
        self._entries[path.name] = {"stat": stamp, "sha256": digest}
        self._changed = True
        return digest

    def save(self) -> None:
        """Write the record (atomically) if it changed; a folder that cannot be written is left as it is."""
        if not self._changed:
            return
        tmp = self.path.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self._entries, sort_keys=True), encoding="utf-8")
            tmp.replace(self.path)
            self._changed = False
        except OSError as e:
            log.debug("cannot record verified shard hashes in %s: %s", self.path, e)
            tmp.unlink(missing_ok=True)
