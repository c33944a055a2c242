"""Training data: a seeded random Markov source with a known entropy rate, a text-file source, token shards
(`swarm.data.shard_source`), and the per-driver draws from them.

The Markov source draws each row of a first-order transition matrix from a symmetric Dirichlet distribution;
sequences start in the stationary distribution, so every next-token prediction has conditional entropy equal to
the chain's entropy rate: the best reachable mean loss (nats), reported as ``loss_floor``.

Shards: the samples of microbatch ``index`` of ``step`` fed by the driver with key ``shard_key`` (its PeerID
bytes) come from a generator seeded with ``(run seed, shard_key, step, index)``: deterministic for that
driver and independent of every other driver's, so no two peers feed the same samples in a step. Token shards
place each driver's windows by position instead (`PositionalSource`, see `swarm.data.shard_source`).

Held-out data (`ShardedData.eval_microbatch`, for the validation loss): the same microbatches on every node at every
step. Token shards read their validation split in order; the Markov source draws from a fixed seed no driver's
microbatch uses; a text file has no split, so its windows come from the whole file (a generator of a fixed seed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from swarm.run.config import RunConfig
from swarm.errors import ConfigError


class DataSource(Protocol):
    """Produces token sequences of length ``seq_len + 1`` (inputs plus shifted targets)."""

    loss_floor: float | None

    def sample(self, rng: np.random.Generator, num_samples: int, length: int) -> np.ndarray: ...


@runtime_checkable
class PositionalSource(Protocol):
    """A source that places each driver's windows itself (`swarm.data.shard_source.ShardSource.draw`), so that
    drivers' windows in one step are disjoint unless their position ranges overlap."""

    def draw(
        self, *, seed: int, driver_key: bytes, step: int, index: int, num_samples: int, stride: int, length: int
    ) -> np.ndarray: ...


@runtime_checkable
class ValidationSource(Protocol):
    """A source with a held-out split (`swarm.data.shard_source.ShardSource`)."""

    def num_windows(self, length: int, split: str = "train") -> int: ...

    def validation_batch(self, start: int, num_samples: int, length: int) -> np.ndarray: ...


EVAL_SEED_WORD = 0x4556414C  # "EVAL": held-out draws of sources without a split; no driver's seed has 3 words


class MarkovSource:
    """First-order Markov chain over ``vocab_size`` tokens with Dirichlet(``concentration``) rows."""

    def __init__(self, vocab_size: int, *, concentration: float, seed: int) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D41524B]))
        self.transitions = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
        self.transitions = np.clip(self.transitions, 1e-12, None)
        self.transitions /= self.transitions.sum(axis=1, keepdims=True)
        self._cumulative = np.cumsum(self.transitions, axis=1)
        self._cumulative[:, -1] = 1.0
        self.stationary = _stationary(self.transitions)
        row_entropy = -(self.transitions * np.log(self.transitions)).sum(axis=1)
        self.loss_floor: float | None = float(self.stationary @ row_entropy)

    def sample(self, rng: np.random.Generator, num_samples: int, length: int) -> np.ndarray:
        """``num_samples`` sequences of ``length`` tokens, started in the stationary distribution."""
        out = np.empty((num_samples, length), dtype=np.int64)
        cum_stationary = np.cumsum(self.stationary)
        cum_stationary[-1] = 1.0
        out[:, 0] = np.searchsorted(cum_stationary, rng.random(num_samples), side="right")
        uniforms = rng.random((num_samples, length))
        for t in range(1, length):
            rows = self._cumulative[out[:, t - 1]]
            out[:, t] = (rows < uniforms[:, t : t + 1]).sum(axis=1)
        return out


def _stationary(transitions: np.ndarray) -> np.ndarray:
    """The stationary distribution (left eigenvector for eigenvalue 1), by power iteration."""
    pi = np.full(transitions.shape[0], 1.0 / transitions.shape[0])
    for _ in range(10_000):
        nxt = pi @ transitions
        if np.abs(nxt - pi).sum() < 1e-13:
            return nxt / nxt.sum()
        pi = nxt
    return pi / pi.sum()


class TextSource:
    """A text file read as bytes (vocabulary 256); samples are windows at random offsets."""

    loss_floor: float | None = None

    def __init__(self, path: str | Path) -> None:
        try:
            self.data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).astype(np.int64)
        except OSError as e:
            raise ConfigError(f"data.path {str(path)!r} cannot be read: {e}") from None

    def sample(self, rng: np.random.Generator, num_samples: int, length: int) -> np.ndarray:
        if len(self.data) < length + 1:
            raise ConfigError(f"data.path has {len(self.data)} bytes, fewer than one sample of {length}")
        starts = rng.integers(0, len(self.data) - length + 1, size=num_samples)
        return np.stack([self.data[s : s + length] for s in starts])


def make_source(cfg: RunConfig) -> DataSource:
    """The data source named by the run config (shards: of the manifest on this machine, see `bind_data`)."""
    if cfg.data.source == "text":
        return TextSource(cfg.data.path)
    if cfg.data.source in ("shards", "stdlib"):
        from swarm.data.binding import manifest_path
        from swarm.data.shard_source import ShardSource

        return ShardSource(manifest_path(cfg))
    return MarkovSource(cfg.model.vocab_size, concentration=cfg.data.markov_concentration, seed=cfg.seed)


@dataclass(frozen=True, kw_only=True)
class Microbatch:
    """Token ids ``inputs`` [B, T] and next-token ``targets`` [B, T] of one microbatch."""

    step: int
    index: int
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.inputs.shape[0])


class ShardedData:
    """A driver's deterministic shard: microbatch ``index`` of ``step`` for ``shard_key``."""

    def __init__(self, cfg: RunConfig, shard_key: bytes, source: DataSource | None = None) -> None:
        self.cfg = cfg
        self.source = source if source is not None else make_source(cfg)
        self._shard_key = shard_key
        self._key_words = [
            int.from_bytes(hashlib.sha256(shard_key).digest()[i : i + 4], "big") for i in range(0, 16, 4)
        ]

    @property
    def loss_floor(self) -> float | None:
        return self.source.loss_floor

    def eval_microbatch(self, step: int, index: int) -> Microbatch:
        """Held-out microbatch ``index`` (module docstring), tagged with ``step``: the same tokens at every step."""
        size, length = self.cfg.batch.microbatch_size, self.cfg.model.seq_len + 1
        num_val = self.source.num_windows(length, "val") if isinstance(self.source, ValidationSource) else 0
        if isinstance(self.source, ValidationSource) and num_val > 0:
            start = (index * size) % num_val
            array = self.source.validation_batch(start, min(size, num_val - start), length)
        else:
            rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, EVAL_SEED_WORD, index]))
            array = self.source.sample(rng, size, length)
        return _split(step, index, torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)))

    def microbatch(self, step: int, index: int, num_samples: int | None = None) -> Microbatch:
        """The samples of one microbatch: the same arguments always give the same tokens."""
        size = num_samples if num_samples is not None else self.cfg.batch.microbatch_size
        length = self.cfg.model.seq_len + 1
        if isinstance(self.source, PositionalSource):
            stride = max(size, self.cfg.batch.microbatch_size)
            array = self.source.draw(
                seed=self.cfg.seed,
                driver_key=self._shard_key,
                step=step,
                index=index,
                num_samples=size,
                stride=stride,
                length=length,
            )
        else:
            rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, *self._key_words, step, index]))
            array = self.source.sample(rng, size, length)
        return _split(step, index, torch.from_numpy(array))


def _split(step: int, index: int, tokens: torch.Tensor) -> Microbatch:
    """The microbatch of windows ``tokens`` [B, T + 1]: inputs and the next-token targets."""
    return Microbatch(step=step, index=index, inputs=tokens[:, :-1].contiguous(), targets=tokens[:, 1:].contiguous())
