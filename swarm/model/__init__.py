"""The model: a tiny GPT in plain PyTorch, cut into pipeline stages."""

from swarm.model.gpt import Block, Embedding, Head, build_gpt_pieces, lm_loss
from swarm.model.stages import (
    InputSpec,
    PipelineModel,
    StageInputError,
    StageModel,
    build_stage,
    build_stages,
    stage_block_ranges,
)

__all__ = [
    "Block",
    "Embedding",
    "Head",
    "InputSpec",
    "PipelineModel",
    "StageInputError",
    "StageModel",
    "build_gpt_pieces",
    "build_stage",
    "build_stages",
    "lm_loss",
    "stage_block_ranges",
]
