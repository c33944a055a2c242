"""Parameter count and training memory of an ``hf`` model per pipeline stage, computed from its config alone.

A stage holds its decoder layers; stage 0 also the embeddings, the last stage the final norm and the LM head. With
tied embeddings the matrix is counted once in the model's total but on both the first and the last stage, which
each hold a copy across machines. Training memory is 16 bytes per parameter: fp32 weights, gradients and AdamW's
two moments (activations and the pipeline's in-flight microbatches come on top).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarm.model.stages import stage_block_ranges

TRAIN_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True, kw_only=True)
class ModelSizes:
    """Parameters of the whole model and of each stage, and each stage's training memory."""

    total_params: int
    stage_params: tuple[int, ...]

    @property
    def stage_train_bytes(self) -> tuple[int, ...]:
        return tuple(TRAIN_BYTES_PER_PARAM * n for n in self.stage_params)


def model_sizes(config: Any, num_stages: int) -> ModelSizes:
    """The sizes of a `transformers` config object (`swarm.model.hf.hf_transformers_config`) cut into stages."""
    h, v = config.hidden_size, config.vocab_size
    embed = v * h
    if config.model_type == "gpt2":
        embed += config.n_positions * h
        layer, final_norm = _gpt2_layer(config), 2 * h
    else:
        layer, final_norm = _llama_layer(config), h
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = v * h
    stage_params = []
    for i, layers in enumerate(stage_block_ranges(config.num_hidden_layers, num_stages)):
        n = len(layers) * layer
        if i == 0:
            n += embed
        if i == num_stages - 1:
            n += final_norm + (0 if tied and num_stages == 1 else head)
        stage_params.append(n)
    total = embed + config.num_hidden_layers * layer + final_norm + (0 if tied else head)
    return ModelSizes(total_params=total, stage_params=tuple(stage_params))


def _llama_layer(config: Any) -> int:
    """Llama / Qwen2 / Qwen3: attention (grouped-query), SwiGLU MLP, two RMSNorms (Qwen3: q/k norms too)."""
    h, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = h * q + 2 * h * kv + q * h
    if config.model_type == "qwen2":
        attention += q + 2 * kv  # q/k/v biases, none on o
    elif getattr(config, "attention_bias", False):
        attention += q + 2 * kv + h
    if config.model_type == "qwen3":
        attention += 2 * head_dim  # q_norm, k_norm
    mlp = 3 * h * config.intermediate_size
    if getattr(config, "mlp_bias", False):
        mlp += 2 * config.intermediate_size + h
    return attention + mlp + 2 * h


def _gpt2_layer(config: Any) -> int:
    """GPT-2: fused qkv and output projections with biases, a GELU MLP, two LayerNorms."""
    h = config.hidden_size
    inner = config.n_inner or 4 * h
    return (h * 3 * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h) + 2 * 2 * h
