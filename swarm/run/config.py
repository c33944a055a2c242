"""The run: one TOML file describes what the swarm trains; its canonical hash is the run id.

A :class:`RunConfig` has sections ``model``, ``pipeline``, ``batch``, ``optimizer``, ``codecs``, ``data``,
``verification``, ``averaging``, ``precision``, ``eval`` and a ``seed``. Two nodes may train together only if
their configs are identical; :meth:`RunConfig.check_same_run` names the first differing field so a misconfigured
node is refused with a useful error. Every field is declared with `swarm.configs.setting` (its doc and range);
`RunConfig.load` applies command-line overrides (``--set optimizer.lr=1e-3``) to the parsed TOML, so they change
the run id as an edit would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import tomllib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from swarm.configs import Config, apply_overrides, build, canonical_json, flatten, setting
from swarm.errors import ConfigError
from swarm.run.averaging import AveragingSettings
from swarm.run.hf_config import hf_config_sha256, hf_get, read_hf_config
from swarm.run.precision import PrecisionConfig
from swarm.verification.settings import VerificationSettings

DEFAULT_PRESET = "tiny_gpt"  # the default run: swarm/run/presets/tiny_gpt.toml, shipped as package data
OPTIMIZERS = ("adamw", "sgd")
MODEL_FAMILIES = ("gpt", "hf")
DATA_SOURCES = ("markov", "text", "shards", "stdlib")
# = swarm.compression.blockwise8.VALID_BLOCKSIZES (a test checks); not imported from there, which would load torch
BLOCKWISE8_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


class ModelConfig(Config, section="model"):
    """The model: the tiny GPT (``family = "gpt"``, shaped by the fields below, or a user factory
    ``package.module:function`` returning stage modules and the loss), or a Hugging Face `transformers` config
    (``family = "hf"``: ``hf_config`` a path to a ``config.json``, or ``hf_preset`` a shipped one), built with
    seeded random weights and cut at decoder-layer boundaries. With ``hf`` the config gives the shape:
    ``vocab_size`` must equal its vocabulary (the data's tokens) and ``d_model``, ``num_heads``, ``num_blocks``
    and ``mlp_ratio`` are unused."""

    family: str = setting(
        default="gpt", choices=MODEL_FAMILIES, doc="gpt (the tiny GPT) or hf (a transformers config)."
    )
    hf_config: str = setting(default="", doc="family hf: path to a transformers config.json.")
    hf_preset: str = setting(default="", doc="family hf: a shipped model config (tiny_llama, llama_20m, ...).")

    vocab_size: int = setting(default=64, ge=2, le=1 << 20, doc="Tokens in the vocabulary (>= 256 for text data).")
    d_model: int = setting(default=64, ge=4, le=1 << 16, doc="Width of the residual stream; a multiple of num_heads.")
    num_heads: int = setting(default=4, ge=1, le=1024, doc="Attention heads per block.")
    num_blocks: int = setting(default=4, ge=1, le=1024, doc="Transformer blocks; stages are cut between them.")
    seq_len: int = setting(default=32, ge=2, le=1 << 16, doc="Tokens per sample.")
    mlp_ratio: int = setting(default=4, ge=1, le=64, doc="Hidden width of each block's MLP, in multiples of d_model.")
    factory: str = setting(default="", doc="'package.module:function' that builds the stages instead ('': tiny GPT).")

    def validate(self) -> None:
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})")
        if self.factory and ":" not in self.factory:
            raise self.invalid("factory", f"must look like 'package.module:function', got {self.factory!r}")
        if self.family != "hf":
            if self.hf_config or self.hf_preset:
                raise self.invalid("family", "must be 'hf' when model.hf_config or model.hf_preset is set")
            return
        if self.factory:
            raise self.invalid("factory", "must be empty with family 'hf' (the transformers config builds the model)")
        hf = self.hf_dict()
        if hf_get(hf, "vocab_size") != self.vocab_size:
            raise self.invalid(
                "vocab_size", f"is {self.vocab_size} but the hf config's vocab_size is {hf_get(hf, 'vocab_size')}"
            )
        max_positions = hf_get(hf, "max_positions")
        if isinstance(max_positions, int) and self.seq_len > max_positions:
            raise self.invalid("seq_len", f"is {self.seq_len}, above the hf config's {max_positions} positions")

    def hf_dict(self) -> dict[str, Any]:
        """The transformers config of a ``family = "hf"`` model, as a plain dict (ConfigError if unreadable)."""
        return read_hf_config(path=self.hf_config, preset=self.hf_preset)

    @property
    def width(self) -> int:
        """The features per token between blocks: ``d_model`` (tiny GPT) or the hf config's hidden size."""
        return int(hf_get(self.hf_dict(), "hidden_size")) if self.family == "hf" else self.d_model

    @property
    def num_layers(self) -> int:
        """The blocks (tiny GPT) or decoder layers (hf) that stages are cut between."""
        return int(hf_get(self.hf_dict(), "num_layers")) if self.family == "hf" else self.num_blocks


class PipelineConfig(Config, section="pipeline"):
    """How the model is cut: ``num_stages`` contiguous groups of blocks.

    ``retie_every_steps``: every that many steps, stage 0 and the last stage set their copies of the tied
    embedding/head matrix to the mean of both before the update, which repairs any drift a failed ``stage.tied``
    exchange left (0: never; a no-op, bit for bit, while the copies are equal).

    ``activation_bottleneck_ratio``: r > 1 puts a learned bottleneck on every stage boundary
    (`swarm.compression.bottleneck`): the sending stage ends with a down-projection to ``width // r`` features, the
    receiving stage starts with the up-projection back, both trained with the model; 1 turns it off.
    """

    num_stages: int = setting(default=2, ge=1, le=256, doc="Pipeline stages (at most model.num_blocks).")
    retie_every_steps: int = setting(
        default=10, ge=0, le=1_000_000, doc="Steps between re-ties of the tied embedding/head copies (0: never)."
    )
    activation_bottleneck_ratio: int = setting(
        default=1, ge=1, le=1 << 16, doc="Width / features sent between stages by a learned bottleneck (1: off)."
    )


class BatchConfig(Config, section="batch"):
    """Samples per optimizer step (summed over the whole swarm) and per microbatch."""

    target_batch_size: int = setting(default=64, ge=1, le=1 << 24, doc="Samples per optimizer step, swarm-wide.")
    microbatch_size: int = setting(default=8, ge=1, le=1 << 16, doc="Samples per microbatch sent down the pipeline.")

    def validate(self) -> None:
        if self.microbatch_size > self.target_batch_size:
            raise ConfigError(
                f"batch.microbatch_size ({self.microbatch_size}) must not exceed batch.target_batch_size "
                f"({self.target_batch_size})"
            )


class OptimizerConfig(Config, section="optimizer"):
    """The optimizer every stage applies after averaging: ``adamw`` or ``sgd``."""

    name: str = setting(default="adamw", choices=OPTIMIZERS, doc="The optimizer: adamw or sgd.")
    lr: float = setting(default=3e-3, ge=0.0, le=10.0, doc="Learning rate after the warmup.")
    weight_decay: float = setting(default=0.0, ge=0.0, le=10.0, doc="Decoupled weight decay (adamw) or L2 (sgd).")
    beta1: float = setting(default=0.9, ge=0.0, le=0.99999, doc="adamw: decay of the first-moment average.")
    beta2: float = setting(default=0.95, ge=0.0, le=0.99999999, doc="adamw: decay of the second-moment average.")
    momentum: float = setting(default=0.0, ge=0.0, le=0.99999, doc="sgd: momentum.")
    warmup_steps: int = setting(default=0, ge=0, le=1 << 30, doc="Steps of linear learning-rate warmup (0: none).")


class CodecsConfig(Config, section="codecs"):
    """Codec per role (names from ``compression``); tensors under ``min_compress_numel`` go uncompressed.

    ``topk_fraction`` (share of values kept, in (0, 1]) and ``blockwise8_blocksize`` configure those codecs
    wherever a role names them; their defaults are `swarm.compression.CodecPolicy`'s.
    """

    activations: str = setting(default="none", doc="Codec of the activations sent forward.")
    activation_grads: str = setting(default="none", doc="Codec of the activation gradients sent backward.")
    allreduce: str = setting(default="none", doc="Codec of the gradient parts in the all-reduce.")
    state: str = setting(default="none", doc="Codec of stage states downloaded by joining peers.")
    min_compress_numel: int = setting(default=1024, ge=0, le=1 << 40, doc="Tensors with fewer elements go as is.")
    topk_fraction: float = setting(default=0.01, gt=0, le=1, doc="topk: the share of values kept.")
    blockwise8_blocksize: int = setting(
        default=4096, choices=BLOCKWISE8_BLOCKSIZES, doc="blockwise8: values per quantization block."
    )

    def validate(self) -> None:
        from swarm.compression import codec_names

        for name in ("activations", "activation_grads", "allreduce", "state"):
            if getattr(self, name) not in codec_names():
                raise self.invalid(name, f"must be one of {codec_names()}, got {getattr(self, name)!r}")

    def policy(self) -> Any:
        """The `swarm.compression.CodecPolicy` of these settings."""
        from swarm.compression import CodecPolicy

        return CodecPolicy(
            activations=self.activations,
            activation_grads=self.activation_grads,
            allreduce=self.allreduce,
            state=self.state,
            min_compress_numel=self.min_compress_numel,
            topk_fraction=self.topk_fraction,
            blockwise8_blocksize=self.blockwise8_blocksize,
        )


class DataConfig(Config, section="data"):
    """Where samples come from: a seeded Markov source (``markov``), a text file read as bytes (``text``), token
    shards named by a manifest (``shards``, see docs/training.md "Data"), or the Python standard library's sources
    tokenized by a BPE trained on them (``stdlib``, built once into a cache folder).

    ``manifest_sha256`` and ``tokenizer_sha256`` name the data by content: left empty in the file, they are filled
    in from the manifest before a node starts (`swarm.data.bind_data`), so they are part of the run id on every
    node; set in the file, a node whose files differ refuses to start. Once ``manifest_sha256`` is set, the
    ``manifest`` path is machine-local: it is left out of the run id, so each machine may keep the shards elsewhere.
    """

    source: str = setting(default="markov", choices=DATA_SOURCES, doc="markov, text, shards or stdlib.")
    path: str = setting(default="", doc="The text file read as bytes when source = 'text'.")
    markov_concentration: float = setting(
        default=0.1, ge=1e-4, le=1e4, doc="markov: Dirichlet concentration of each row (small: predictable)."
    )
    manifest: str = setting(default="", doc="shards: the manifest.json `swarm-data prepare` wrote.")
    manifest_sha256: str = setting(default="", doc="SHA-256 of the manifest ('': filled in when a node starts).")
    tokenizer_sha256: str = setting(default="", doc="SHA-256 of the tokenizer file ('': filled in from the manifest).")
    stdlib_max_bytes: int = setting(
        default=4 << 20, ge=1 << 10, le=1 << 32, doc="stdlib: bytes of stdlib source to tokenize (a sorted prefix)."
    )

    def validate(self) -> None:
        if self.source == "text" and not self.path:
            raise ConfigError("data.path must name a text file when data.source = 'text'")
        if self.source == "shards" and not self.manifest:
            raise ConfigError("data.manifest must name a manifest.json when data.source = 'shards'")
        for name in ("manifest_sha256", "tokenizer_sha256"):
            value = getattr(self, name)
            if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
                raise self.invalid(name, f"must be 64 lowercase hex digits or empty, got {value!r}")


class EvalConfig(Config, section="eval"):
    """Validation loss every ``every_steps`` steps (and at ``max_steps``): ``batches`` microbatches of the held-out
    data, forward only, run by one driver of the swarm (the lowest PeerID among the drivers it sees) and published
    in its progress record. Held-out data: the validation split of token shards (``shards``, ``stdlib``); for
    ``markov``, sequences drawn from a separate fixed seed; for ``text``, windows of the same file (no split)."""

    every_steps: int = setting(default=0, ge=0, le=1 << 30, doc="Evaluate every this many steps (0: never).")
    batches: int = setting(default=4, ge=1, le=4096, doc="Microbatches of held-out data per evaluation.")


class RunConfig(Config, section="run"):
    """Everything that must be identical on every node of one run."""

    name: str = setting(default="tiny-gpt", doc="Run name: letters, digits, '-' and '_'; prefixes the run id.")
    seed: int = setting(default=0, ge=0, le=(1 << 63) - 1, doc="Seed of the initial weights and the data.")
    model: ModelConfig = setting(default_factory=ModelConfig, doc="The model.")
    pipeline: PipelineConfig = setting(default_factory=PipelineConfig, doc="How the model is cut into stages.")
    batch: BatchConfig = setting(default_factory=BatchConfig, doc="Batch sizes.")
    optimizer: OptimizerConfig = setting(default_factory=OptimizerConfig, doc="The optimizer.")
    codecs: CodecsConfig = setting(default_factory=CodecsConfig, doc="Compression per role.")
    data: DataConfig = setting(default_factory=DataConfig, doc="The training data.")
    verification: VerificationSettings = setting(
        default_factory=VerificationSettings, doc="Checking of work and rewards."
    )
    averaging: AveragingSettings = setting(
        default_factory=AveragingSettings, doc="How stage replicas combine their work."
    )
    precision: PrecisionConfig = setting(default_factory=PrecisionConfig, doc="The dtype stages compute in.")
    eval: EvalConfig = setting(default_factory=EvalConfig, doc="Validation loss on held-out data.")

    def validate(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise self.invalid("name", f"must be a non-empty string of letters, digits, '-' and '_', got {self.name!r}")
        if not self.model.factory and self.pipeline.num_stages > self.model.num_layers:
            what = "the hf config's decoder layers" if self.model.family == "hf" else "model.num_blocks"
            raise ConfigError(
                f"pipeline.num_stages ({self.pipeline.num_stages}) must not exceed {what} "
                f"({self.model.num_layers}): stages are cut at block boundaries"
            )
        self._check_bottleneck()
        if self.data.source == "text" and not self.model.factory and self.model.vocab_size < 256:
            raise ConfigError("model.vocab_size must be >= 256 for data.source = 'text' (byte-level tokens)")
        if self.data.source == "stdlib" and self.model.vocab_size < 258:
            raise ConfigError("model.vocab_size must be >= 258 for data.source = 'stdlib' (it is the BPE's size)")

    def _check_bottleneck(self) -> None:
        ratio = self.pipeline.activation_bottleneck_ratio
        if ratio == 1:
            return
        if self.model.factory:
            raise ConfigError(
                "pipeline.activation_bottleneck_ratio must be 1 with a model.factory (the bottleneck is built for "
                "the tiny GPT and hf families, whose stage width the run config gives)"
            )
        width = self.model.width
        if width % ratio:
            raise ConfigError(
                f"pipeline.activation_bottleneck_ratio ({ratio}) must divide the model width ({width}) exactly"
            )

    # ---- identity of the run -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every field (the canonical form's source)."""
        return dataclasses.asdict(self)

    def canonical_bytes(self) -> bytes:
        """Sorted-key compact JSON of the run's identity (`identity_dict`): equal runs, equal bytes."""
        return canonical_json(self.identity_dict())

    def identity_dict(self) -> dict[str, Any]:
        """What makes the run: every field (`identity`: less a bound shard manifest's local path), and for a
        ``family = "hf"`` run the SHA-256 of its transformers config, so two nodes whose config files differ are
        different runs. Nodes publish this form in their config entries (the join check)."""
        data = identity(self.to_dict())
        if self.model.family == "hf":
            data["model"] = {**data["model"], "hf_config_sha256": hf_config_sha256(self.model.hf_dict())}
        return data

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
        mine = flatten(self.identity_dict())
        theirs = flatten(other.identity_dict() if isinstance(other, RunConfig) else identity(other))
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
        return build(cls, data)

    @classmethod
    def load(cls, spec: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
        """Load a run file, or a shipped preset by name (the default run ``tiny_gpt`` when ``spec`` is None), with
        ``overrides`` (``optimizer.lr=1e-3``, as ``--set`` gives them) applied to the parsed TOML: an override
        changes the run id exactly as the same edit of the file would."""
        text, label = read_run_text(spec)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"run config {label!r} is not valid TOML: {e}") from None
        if not data:  # the defaults are a run of their own: an empty file would silently train something else
            raise ConfigError(
                f"run config {label!r} is empty (no keys); write the run's settings, or omit --config for the "
                f"default run {DEFAULT_PRESET!r}"
            )
        return cls.from_dict(apply_overrides(data, overrides, cls))

    @classmethod
    def from_toml(cls, path: str | Path | None = None) -> RunConfig:
        """Load a run file, or a shipped preset by name (the default run ``tiny_gpt`` when ``path`` is None)."""
        return cls.load(path)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run config's dict (`RunConfig.to_dict`) that is the run: all of it, except the machine-local
    ``data.manifest`` path once ``data.manifest_sha256`` names the data by content."""
    data = config.get("data")
    if isinstance(data, dict) and data.get("manifest_sha256"):
        return {**config, "data": {**data, "manifest": ""}}
    return config


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


def canonical_hash(data: dict[str, Any]) -> str | None:
    """SHA-256 hex of the canonical form of a run config dictionary's `identity` (what `RunConfig.config_hash`
    gives for its `to_dict`), or None if ``data`` is not JSON data (e.g. a peer's record holding bytes)."""
    try:
        return hashlib.sha256(canonical_json(identity(data))).hexdigest()
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
