"""`ShardSource`: training windows drawn from memory-mapped token shards (a `DataSource`).

The train split is cut into ``N`` aligned windows of ``length`` tokens (``seq_len + 1``: inputs plus shifted
targets) inside each shard: window ``w`` of a shard starts at token ``w * length``; a tail shorter than a window
is skipped. The windows of step ``s`` are ordered by a pseudo-random permutation ``P_s`` of ``range(N)`` keyed by
(run seed, ``s``), the same on every driver. A driver starts at position ``o = H(run seed, driver PeerID, s) mod
N``, and sample ``j`` of its microbatch ``i`` is window ``P_s((o + i * microbatch_size + j) mod N)`` (`draw`).

So the same (driver, step, microbatch) always reads the same tokens; a driver never reads a window twice in a
step (while it reads at most ``N`` windows); and two drivers read a common window only when their ranges of
positions overlap: for ``r`` windows each, with probability about ``2r / N`` per step (independent draws would
collide with probability about ``r * r / N``). `swarm-data prepare` reports the token counts, so ``N`` is
known. Only the windows read are paged in; the corpus is never loaded whole.

The validation split is read in order, window by window (`validation_batch`), for evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import hashlib

from swarm.data.manifest import Manifest, ShardInfo, load_manifest
from swarm.data.permutation import Permutation
from swarm.errors import ConfigError


class _Windows:
    """The aligned windows of ``length`` tokens in some shards."""

    def __init__(self, maps: list[np.memmap], length: int) -> None:
        self.maps, self.length = maps, length
        counts = np.array([len(m) // length for m in maps], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.total = int(self.ends[-1]) if len(counts) else 0

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.length), dtype=np.int64)
        shards = np.searchsorted(self.ends, indices, side="right")
        for row, (index, shard) in enumerate(zip(indices.tolist(), shards.tolist(), strict=True)):
            offset = (index - (int(self.ends[shard - 1]) if shard else 0)) * self.length
            out[row] = self.maps[shard][offset : offset + self.length]
        return out


class ShardSource:
    """Windows of the train split of the shards a manifest lists (see the module doc). No loss floor is known."""

    loss_floor: float | None = None

    def __init__(self, manifest: Manifest | str | Path) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self._maps = {split: [self._open(s) for s in self.manifest.split(split)] for split in ("train", "val")}
        self._windows: dict[tuple[str, int], _Windows] = {}

    def _open(self, shard: ShardInfo) -> np.memmap:
        path = self.manifest.folder / shard.file
        try:
            return np.memmap(
                path, dtype=np.dtype(self.manifest.dtype).newbyteorder("<"), mode="r", shape=(shard.tokens,)
            )
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot map token shard {str(path)!r}: {e}; run `swarm-data verify` on the folder"
            ) from None

    def windows(self, split: str, length: int) -> _Windows:
        key = (split, length)
        if key not in self._windows:
            self._windows[key] = _Windows(self._maps[split], length)
        return self._windows[key]

    def num_windows(self, length: int, split: str = "train") -> int:
        """How many aligned windows of ``length`` tokens ``split`` holds."""
        return self.windows(split, length).total

    def _train(self, length: int, num_samples: int) -> _Windows:
        windows = self.windows("train", length)
        if windows.total < num_samples:
            raise ConfigError(
                f"the train split of {str(self.manifest.path)!r} holds {windows.total} windows of {length} tokens, "
                f"fewer than a microbatch of {num_samples}: prepare more data or shorten model.seq_len"
            )
        return windows

    def sample(self, rng: np.random.Generator, num_samples: int, length: int) -> np.ndarray:
        """``num_samples`` distinct train windows of ``length`` tokens, drawn with ``rng`` (the `DataSource` way;
        `ShardedData` uses `draw`)."""
        windows = self._train(length, num_samples)
        return windows.read(rng.choice(windows.total, size=num_samples, replace=False))

    def draw(
        self, *, seed: int, driver_key: bytes, step: int, index: int, num_samples: int, stride: int, length: int
    ) -> np.ndarray:
        """Microbatch ``index`` of ``step`` for the driver ``driver_key``: ``num_samples`` windows (module doc;
        ``stride`` is the run's microbatch size)."""
        windows = self._train(length, num_samples)
        n = windows.total
        step_key = b"swarm-shards-step" + seed.to_bytes(8, "big") + step.to_bytes(8, "big")
        start = int.from_bytes(hashlib.sha256(step_key + driver_key).digest()[:8], "big") % n
        positions = (start + index * stride + np.arange(num_samples, dtype=np.int64)) % n
        return windows.read(Permutation(n, step_key)(positions))

    def validation_batch(self, start: int, num_samples: int, length: int) -> np.ndarray:
        """Validation windows ``start .. start + num_samples`` (fewer at the end of the split; wraps never)."""
        windows = self.windows("val", length)
        stop = min(start + num_samples, windows.total)
        return windows.read(np.arange(start, max(stop, start), dtype=np.int64))
