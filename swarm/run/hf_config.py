"""Hugging Face model configs of a run (``[model] family = "hf"``): a ``config.json`` by path, or a shipped preset.

The presets are ``swarm/run/hf_presets/<name>.json`` (package data): plain `transformers` configs. This module
reads them as JSON only (no `transformers` import), so the run config can check a run (layer count, vocabulary,
sequence length, supported family) and hash the model config into the run id without loading torch.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from swarm.configs import canonical_json
from swarm.errors import ConfigError

# model_type values whose decoder layers swarm cuts into stages (the split-equivalence tests cover each one)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gpt2")


def hf_preset_names() -> tuple[str, ...]:
    """The model configs shipped inside the package (``swarm/run/hf_presets/*.json``), without the suffix."""
    folder = resources.files("swarm.run") / "hf_presets"
    return tuple(sorted(item.name[: -len(".json")] for item in folder.iterdir() if item.name.endswith(".json")))


def read_hf_config(*, path: str = "", preset: str = "") -> dict[str, Any]:
    """The config dict of ``path`` (a ``config.json``) or of the shipped ``preset``; ConfigError names the field."""
    if bool(path) == bool(preset):
        raise ConfigError("model: family 'hf' needs exactly one of model.hf_config (a path) and model.hf_preset")
    if preset:
        if preset not in hf_preset_names():
            raise ConfigError(f"model.hf_preset {preset!r} is not shipped (presets: {', '.join(hf_preset_names())})")
        text = (resources.files("swarm.run") / "hf_presets" / f"{preset}.json").read_text(encoding="utf-8")
        label = f"preset {preset}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"model.hf_config: cannot read {path!r}: {e}") from None
        label = path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.hf_config: {label} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.hf_config: {label} must hold a JSON object")
    check_hf_config(data, label)
    return data


def check_hf_config(data: dict[str, Any], label: str) -> None:
    """Raise ConfigError unless swarm can cut this config into stages as it is."""
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model.hf_config: {label} has model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if data.get("use_sliding_window") or any(t != "full_attention" for t in data.get("layer_types") or ()):
        raise ConfigError(f"model.hf_config: {label} uses sliding-window layers, which swarm's stages do not mask")
    for key in ("vocab_size", "num_layers"):
        value = hf_get(data, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.hf_config: {label} lacks a positive integer {key}")


_ALIASES = {
    "num_layers": ("num_hidden_layers", "n_layer"),
    "hidden_size": ("hidden_size", "n_embd"),
    "max_positions": ("max_position_embeddings", "n_positions"),
    "num_heads": ("num_attention_heads", "n_head"),
    "vocab_size": ("vocab_size",),
}


def hf_get(data: dict[str, Any], key: str) -> Any:
    """A shape field by its swarm name, whatever the family calls it (GPT-2: ``n_layer``, Llama: ...)."""
    for name in _ALIASES[key]:
        if name in data:
            return data[name]
    return None


def hf_config_sha256(data: dict[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON: part of the run id, so every node of a run builds the same model."""
    return hashlib.sha256(canonical_json(data)).hexdigest()
