"""The run: one TOML file describes what the swarm trains; its canonical hash is the run id.

A :class:`RunConfig` has sections ``model``, ``pipeline``, ``batch``, ``optimizer``, ``codecs``, ``data``,
``verification``, ``averaging`` and a ``seed``. Two nodes may train together only if their configs are identical;
:meth:`RunConfig.check_same_run` names the first differing field so a misconfigured node is refused with a useful error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from swarm.errors import ConfigError
from swarm.verification.settings import VerificationSettings

DEFAULT_PRESET = "tiny_gpt"  # the default run: swarm/run/presets/tiny_gpt.toml, shipped as package data
OPTIMIZERS = ("adamw", "sgd")
DATA_SOURCES = ("markov", "text")


def _check_int(owner: object, name: str, low: int, high: int, section: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{section}.{name} must be an int in [{low}, {high}], got {value!r}")


def _check_float(owner: object, name: str, low: float, high: float, section: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{section}.{name} must be a number in [{low}, {high}], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The tiny GPT (or a user factory ``package.module:function`` returning stage modules and the loss)."""

    vocab_size: int = 64
    d_model: int = 64
    num_heads: int = 4
    num_blocks: int = 4
    seq_len: int = 32
    mlp_ratio: int = 4
    factory: str = ""

    def __post_init__(self) -> None:
        _check_int(self, "vocab_size", 2, 1 << 20, "model")
        _check_int(self, "d_model", 4, 1 << 16, "model")
        _check_int(self, "num_heads", 1, 1024, "model")
        _check_int(self, "num_blocks", 1, 1024, "model")
        _check_int(self, "seq_len", 2, 1 << 16, "model")
        _check_int(self, "mlp_ratio", 1, 64, "model")
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})")
        if self.factory and ":" not in self.factory:
            raise ConfigError(f"model.factory must look like 'package.module:function', got {self.factory!r}")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How the model is cut: ``num_stages`` contiguous groups of blocks.

    ``retie_every_steps``: every that many steps, stage 0 and the last stage set their copies of the tied
    embedding/head matrix to the mean of both before the update, which repairs any drift a failed ``stage.tied``
    exchange left (0: never; a no-op, bit for bit, while the copies are equal).
    """

    num_stages: int = 2
    retie_every_steps: int = 10

    def __post_init__(self) -> None:
        _check_int(self, "num_stages", 1, 256, "pipeline")
        _check_int(self, "retie_every_steps", 0, 1_000_000, "pipeline")


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """Samples per optimizer step (summed over the whole swarm) and per microbatch."""

    target_batch_size: int = 64
    microbatch_size: int = 8

    def __post_init__(self) -> None:
        _check_int(self, "target_batch_size", 1, 1 << 24, "batch")
        _check_int(self, "microbatch_size", 1, 1 << 16, "batch")
        if self.microbatch_size > self.target_batch_size:
            raise ConfigError(
                f"batch.microbatch_size ({self.microbatch_size}) must not exceed batch.target_batch_size "
                f"({self.target_batch_size})"
            )


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer every stage applies after averaging: ``adamw`` or ``sgd``."""

    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")
        _check_float(self, "lr", 0.0, 10.0, "optimizer")
        _check_float(self, "weight_decay", 0.0, 10.0, "optimizer")
        _check_float(self, "beta1", 0.0, 0.99999, "optimizer")
        _check_float(self, "beta2", 0.0, 0.99999999, "optimizer")
        _check_float(self, "momentum", 0.0, 0.99999, "optimizer")
        _check_int(self, "warmup_steps", 0, 1 << 30, "optimizer")


@dataclass(frozen=True, kw_only=True)
class CodecsConfig:
    """Codec per role (names from ``compression``); tensors under ``min_compress_numel`` go uncompressed.

    ``topk_fraction`` (share of values kept, in (0, 1]) and ``blockwise8_blocksize`` configure those codecs
    wherever a role names them; their defaults are `swarm.compression.CodecPolicy`'s.
    """

    activations: str = "none"
    activation_grads: str = "none"
    allreduce: str = "none"
    state: str = "none"
    min_compress_numel: int = 1024
    topk_fraction: float = 0.01
    blockwise8_blocksize: int = 4096

    def __post_init__(self) -> None:
        from swarm.compression import codec_names
        from swarm.compression.blockwise8 import VALID_BLOCKSIZES

        for name in ("activations", "activation_grads", "allreduce", "state"):
            if getattr(self, name) not in codec_names():
                raise ConfigError(f"codecs.{name} must be one of {codec_names()}, got {getattr(self, name)!r}")
        _check_int(self, "min_compress_numel", 0, 1 << 40, "codecs")
        fraction = self.topk_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ConfigError(f"codecs.topk_fraction must be a number in (0, 1], got {fraction!r}")
        blocksize = self.blockwise8_blocksize
        if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in VALID_BLOCKSIZES:
            raise ConfigError(f"codecs.blockwise8_blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")

    def policy(self) -> Any:
        """The `swarm.compression.CodecPolicy` of these settings."""
        from swarm.compression import CodecPolicy

        try:
            return CodecPolicy(
                activations=self.activations,
                activation_grads=self.activation_grads,
                allreduce=self.allreduce,
                state=self.state,
                min_compress_numel=self.min_compress_numel,
                topk_fraction=self.topk_fraction,
                blockwise8_blocksize=self.blockwise8_blocksize,
            )
        except ConfigError as e:
            raise ConfigError(f"codecs: {e}") from None


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where samples come from: a seeded Markov source (``markov``) or a text file read as bytes (``text``)."""

    source: str = "markov"
    path: str = ""
    markov_concentration: float = 0.1

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source == "text" and not self.path:
            raise ConfigError("data.path must name a text file when data.source = 'text'")
        _check_float(self, "markov_concentration", 1e-4, 1e4, "data")


@dataclass(frozen=True, kw_only=True)
class AveragingSettings:
    """How a stage's peers reduce their gradients: a plain weighted ``mean``, or ``centered_clip`` (robust to a
    minority of peers sending huge or sign-flipped gradients; ``clip_tau`` is in gradient-norm units per part)."""

    reduction: str = "mean"
    clip_tau: float = 1.0
    clip_iterations: int = 20

    def __post_init__(self) -> None:
        if self.reduction not in ("mean", "centered_clip"):
            raise ConfigError(f"averaging.reduction must be 'mean' or 'centered_clip', got {self.reduction!r}")
        _check_float(self, "clip_tau", 1e-9, 1e9, "averaging")
        _check_int(self, "clip_iterations", 1, 10_000, "averaging")


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "pipeline": PipelineConfig,
    "batch": BatchConfig,
    "optimizer": OptimizerConfig,
    "codecs": CodecsConfig,
    "data": DataConfig,
    "verification": VerificationSettings,
    "averaging": AveragingSettings,
}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that must be identical on every node of one run."""

    name: str = "tiny-gpt"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    codecs: CodecsConfig = field(default_factory=CodecsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    verification: VerificationSettings = field(default_factory=VerificationSettings)
    averaging: AveragingSettings = field(default_factory=AveragingSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"name must be a non-empty string of letters, digits, '-' and '_', got {self.name!r}")
        _check_int(self, "seed", 0, (1 << 63) - 1, "run")
        if not self.model.factory and self.pipeline.num_stages > self.model.num_blocks:
            raise ConfigError(
                f"pipeline.num_stages ({self.pipeline.num_stages}) must not exceed model.num_blocks "
                f"({self.model.num_blocks}): stages are cut at block boundaries"
            )
        if self.data.source == "text" and not self.model.factory and self.model.vocab_size < 256:
            raise ConfigError("model.vocab_size must be >= 256 for data.source = 'text' (byte-level tokens)")

    # ---- identity of the run -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every field (the canonical form's source)."""
        return dataclasses.asdict(self)

    def canonical_bytes(self) -> bytes:
        """Sorted-key compact JSON of every field: equal configs give equal bytes."""
        return canonical_bytes(self.to_dict())

    def config_hash(self) -> str:
        """SHA-256 hex of the canonical form."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def run_id(self) -> str:
        """``<name>-<first 12 hex of the hash>``: the prefix of every DHT key of this run."""
        return f"{self.name}-{self.config_hash()[:12]}"

    def to_toml(self) -> str:
        """This config as TOML text that `from_toml` reads back to an equal config."""
        lines = [f"name = {json.dumps(self.name)}", f"seed = {self.seed}"]
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                lines.append(f"\n[{section}]")
                lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"

    def check_same_run(self, other: RunConfig | dict[str, Any]) -> None:
        """Raise ConfigError naming the first field where ``other`` differs from this config."""
        mine = _flatten(self.to_dict())
        theirs = _flatten(other.to_dict() if isinstance(other, RunConfig) else other)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key, "<missing>") != theirs.get(key, "<missing>"):
                raise ConfigError(
                    f"run config differs in field {key!r}: this node has {mine.get(key, '<missing>')!r}, the swarm "
                    f"has {theirs.get(key, '<missing>')!r}; start the node with the swarm's run config"
                )

    # ---- the run's inputs ----------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        """ConfigError naming the field unless the run's local inputs are usable: the data file of
        ``data.source = "text"`` (a readable file of at least one sample) and the ``model.factory`` import.

        A node calls this before it listens, so a bad input is one error line, not a failure after joining.
        """
        if self.data.source == "text":
            _check_text_file(self.data.path, self.model.seq_len + 2)  # a window of seq_len + 1 tokens
        if self.model.factory:
            _check_factory(self.model.factory)

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from nested plain data (as parsed from TOML); unknown keys raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"a run config is a table, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"[{key}] must be a table, got {type(value).__name__}")
                kwargs[key] = _build(_SECTIONS[key], value, key)
            elif key in ("name", "seed"):
                kwargs[key] = value
            else:
                raise ConfigError(f"unknown run config key {key!r}; known: name, seed, {', '.join(_SECTIONS)}")
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path | None = None) -> RunConfig:
        """Load a run file, or a shipped preset by name (the default run ``tiny_gpt`` when ``path`` is None)."""
        text, label = read_run_text(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"run config {label!r} is not valid TOML: {e}") from None
        if not data:  # the defaults are a run of their own: an empty file would silently train something else
            raise ConfigError(
                f"run config {label!r} is empty (no keys); write the run's settings, or omit --config for the "
                f"default run {DEFAULT_PRESET!r}"
            )
        return cls.from_dict(data)


def preset_names() -> tuple[str, ...]:
    """The run presets shipped inside the package (``swarm/run/presets/*.toml``), without the suffix."""
    folder = resources.files("swarm.run") / "presets"
    return tuple(sorted(item.name[: -len(".toml")] for item in folder.iterdir() if item.name.endswith(".toml")))


def read_run_text(spec: str | Path | None) -> tuple[str, str]:
    """The TOML text of a run and a label for errors: a file path, or the name of a shipped preset.

    A path that exists is read as a file; otherwise a bare name (``tiny_gpt_robust``, with or without
    ``.toml``) names a preset. Neither gives a ConfigError that lists the presets.
    """
    if spec is None:
        spec = DEFAULT_PRESET
    path = Path(spec)
    if path.exists() or len(path.parts) > 1:
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as e:
            raise ConfigError(f"cannot read run config {str(path)!r}: {e}") from None
    name = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
    if name in preset_names():
        preset = resources.files("swarm.run") / "presets" / f"{name}.toml"
        return preset.read_text(encoding="utf-8"), f"preset {name}"
    raise ConfigError(
        f"cannot read run config {str(spec)!r}: no such file, and no shipped preset of that name "
        f"(presets: {', '.join(preset_names())})"
    )


def canonical_bytes(data: dict[str, Any]) -> bytes:
    """The canonical form of a run config's dictionary (sorted-key compact JSON); TypeError if not JSON data."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def canonical_hash(data: dict[str, Any]) -> str | None:
    """SHA-256 hex of a run config dictionary's canonical form (what `RunConfig.config_hash` gives for its
    `to_dict`), or None if ``data`` is not JSON data (e.g. a peer's record holding bytes)."""
    try:
        return hashlib.sha256(canonical_bytes(data)).hexdigest()
    except (TypeError, ValueError, RecursionError):
        return None


def _check_text_file(path: str, min_bytes: int) -> None:
    file = Path(path)
    try:
        if not file.is_file():
            raise ConfigError(f"data.path {path!r} is not a file (data.source = 'text' reads a text file)")
        size = file.stat().st_size
        with open(file, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"data.path {path!r} cannot be read: {e.strerror or e}") from None
    if size < min_bytes:
        raise ConfigError(f"data.path {path!r} has {size} bytes, fewer than one sample of {min_bytes}")


def _check_factory(spec: str) -> None:
    module_name, _, func_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except Exception as e:  # user code: importing it may raise anything; each is a config error here
        raise ConfigError(f"model.factory {spec!r} cannot be imported: {type(e).__name__}: {e}") from None
    if not callable(factory):
        raise ConfigError(f"model.factory {spec!r} is not callable")


def _build(section_type: type, values: dict[str, Any], section: str) -> Any:
    known = {f.name for f in dataclasses.fields(section_type)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown keys in [{section}]: {sorted(unknown)}; known: {sorted(known)}")
    return section_type(**values)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
