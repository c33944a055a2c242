"""A tiny GPT in plain PyTorch: token embedding, pre-norm transformer blocks, a (tied) head.

The model is built as a list of pieces (embedding, blocks, final norm + head) so that it can be cut at block
boundaries into pipeline stages (`swarm.model.stages`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from swarm.run.config import ModelConfig


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); causal self-attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        shape = (batch, length, self.num_heads, width // self.num_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Embedding(nn.Module):
    """Token embedding plus a learned position embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions[: ids.shape[1]]


class Head(nn.Module):
    """Final LayerNorm and the output projection to vocabulary logits (no bias, so it can be tied)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.weight: torch.Tensor = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))  # as nn.Linear declares it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(x), self.weight)


def init_weights(module: nn.Module, num_blocks: int) -> None:
    """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * num_blocks)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * num_blocks) if name.endswith(("proj.weight", "out.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)
        elif name.endswith("positions"):
            nn.init.normal_(p, 0.0, 0.01)
        elif "ln" in name and name.endswith("weight"):
            nn.init.ones_(p)
        else:
            nn.init.zeros_(p)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_gpt_pieces(cfg: ModelConfig, seed: int) -> tuple[Embedding, list[Block], Head]:
    """The model's pieces with deterministic weights: every node building them with ``seed`` gets the same.

    The head's weight is its own Parameter here; `build_stages` ties it to the embedding."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        embedding = Embedding(cfg)
        blocks = [Block(cfg) for _ in range(cfg.num_blocks)]
        head = Head(cfg)
        for piece in (embedding, *blocks, head):
            init_weights(piece, cfg.num_blocks)
    finally:
        torch.random.set_rng_state(generator_state)
    return embedding, blocks, head
