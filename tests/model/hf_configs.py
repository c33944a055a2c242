"""Tiny `transformers` configs of each supported family, written as config.json files for runs to name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from swarm.run.config import RunConfig

VOCAB = 96
SEQ_LEN = 16
_LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_LLAMA_LIKE},
    "qwen2": {"model_type": "qwen2", **_LLAMA_LIKE, "tie_word_embeddings": False},  # q/k/v biases, untied head
    "qwen3": {"model_type": "qwen3", **_LLAMA_LIKE, "head_dim": 8},  # q/k norms
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": VOCAB,
        "n_embd": 32,
        "n_layer": 4,
        "n_head": 4,
        "n_positions": 64,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
}


def hf_run(tmp_path: Path, family: str, *, num_stages: int, seed: int = 0, **extra: Any) -> RunConfig:
    """A run of the tiny ``family`` config (written under ``tmp_path``) cut into ``num_stages`` stages."""
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps({**TINY_CONFIGS[family], **extra}))
    return RunConfig.from_dict(
        {
            "seed": seed,
            "model": {"family": "hf", "hf_config": str(path), "vocab_size": VOCAB, "seq_len": SEQ_LEN},
            "pipeline": {"num_stages": num_stages},
        }
    )
