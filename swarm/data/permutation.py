"""A keyed pseudo-random permutation of ``range(n)``, computed pointwise (no table): a 4-round Feistel network on
the smallest even number of bits that covers ``n``, with cycle-walking back into ``range(n)``.

`ShardSource` uses one per step, shared by every driver, so that drivers reading disjoint ranges of positions
read disjoint windows; evaluating it costs O(positions), whatever ``n`` is.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 4
_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of ``range(n)`` chosen by ``key`` (bytes)."""

    def __init__(self, n: int, key: bytes) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        digest = hashlib.sha256(key).digest()
        self.keys = [np.uint64(int.from_bytes(digest[8 * r : 8 * r + 8], "big")) for r in range(_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> np.uint64(self.half), x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The images of ``positions`` (ints in ``range(n)``), as int64."""
        y = self._encrypt(np.asarray(positions, dtype=np.uint64))
        limit = np.uint64(self.n)
        while (outside := y >= limit).any():
            y[outside] = self._encrypt(y[outside])
        return y.astype(np.int64)
