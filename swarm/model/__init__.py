"""The model: a tiny GPT in plain PyTorch or a `transformers` config (`swarm.model.hf`), cut into pipeline stages."""

from swarm.model.families import GptFamily, ModelFamily, family_for, merge_stage_tensors, split_whole_tensors
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
    "GptFamily",
    "Head",
    "InputSpec",
    "ModelFamily",
    "PipelineModel",
    "StageInputError",
    "StageModel",
    "build_gpt_pieces",
    "build_stage",
    "build_stages",
    "family_for",
    "lm_loss",
    "merge_stage_tensors",
    "split_whole_tensors",
    "stage_block_ranges",
]
