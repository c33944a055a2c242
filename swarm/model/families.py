"""Model families: how a run's ``[model]`` section becomes pipeline stages, and what each parameter is called in
the whole (unsplit) model.

A family is a small Protocol with two methods. ``gpt`` is the tiny GPT (or the user ``factory``): its whole
model is `PipelineModel`, whose ``state_dict`` the single-file export writes. ``hf`` (`swarm.model.hf`) is a
`transformers` causal LM: its whole model is the `transformers` model, whose names the Hugging Face export writes.
`merge_stage_tensors` and `split_whole_tensors` turn per-stage tensors into whole-model tensors and back; the tied
embedding/head matrix appears once in the whole model, under its stage-0 name, and is taken from stage 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from swarm.errors import ConfigError
from swarm.model.stages import PipelineModel, StageModel, gpt_stages
from swarm.run.config import RunConfig


class ModelFamily(Protocol):
    """Builds a run's stages and names their parameters in the whole model."""

    name: str

    def build_stages(self, run: RunConfig) -> list[StageModel]:
        """Every stage with its deterministic initial weights (identical on every node)."""
        ...

    def build_stage(self, run: RunConfig, index: int) -> StageModel:
        """Stage ``index`` alone, with the same weights `build_stages` gives it (a family may allocate only it)."""
        ...

    def whole_names(self, run: RunConfig, stages: Sequence[StageModel]) -> list[dict[str, str]]:
        """Per stage, ``{stage parameter name: whole-model parameter name}`` (``stages`` as `build_stages` gave)."""
        ...


class GptFamily:
    """`ModelFamily` of ``[model] family = "gpt"``: the tiny GPT, or the stages of ``model.factory``."""

    name = "gpt"

    def build_stages(self, run: RunConfig) -> list[StageModel]:
        return gpt_stages(run)

    def build_stage(self, run: RunConfig, index: int) -> StageModel:
        return gpt_stages(run)[index]  # the model is small, and its seeded init draws the stages in order

    def whole_names(self, run: RunConfig, stages: Sequence[StageModel]) -> list[dict[str, str]]:
        whole = {id(p): name for name, p in PipelineModel(list(stages)).named_parameters()}
        return [{name: whole[id(p)] for name, p in stage.named_parameters()} for stage in stages]


def family_for(run: RunConfig) -> ModelFamily:
    """The family that builds ``run``'s model."""
    if run.model.family == "hf":
        from swarm.model.hf import HfFamily  # imports transformers: only for hf runs

        return HfFamily()
    if run.model.family == "gpt":
        return GptFamily()
    raise ConfigError(f"model.family {run.model.family!r} is not a known family")


def merge_stage_tensors(
    names: Sequence[Mapping[str, str]], tensors: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Whole-model tensors from each stage's ``{stage parameter name: tensor}``; a name two stages share (the tied
    matrix) keeps the first stage's tensor. KeyError-free: a missing or unknown name is a ConfigError."""
    whole: dict[str, torch.Tensor] = {}
    for stage, (stage_names, stage_tensors) in enumerate(zip(names, tensors, strict=True)):
        if set(stage_names) != set(stage_tensors):
            raise ConfigError(
                f"stage {stage} tensors {sorted(set(stage_tensors) ^ set(stage_names))[:5]} do not match its model"
            )
        for name, value in stage_tensors.items():
            whole.setdefault(stage_names[name], value)
    return whole


def split_whole_tensors(
    names: Sequence[Mapping[str, str]], whole: Mapping[str, torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """Each stage's ``{stage parameter name: tensor}`` from whole-model tensors (the inverse of the merge)."""
    missing = sorted({w for stage_names in names for w in stage_names.values()} - set(whole))
    if missing:
        raise ConfigError(f"the whole-model tensors lack {missing[:5]}")
    return [{name: whole[w] for name, w in stage_names.items()} for stage_names in names]
