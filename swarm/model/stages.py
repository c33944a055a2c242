"""Cut the model at block boundaries into pipeline stages; a `StageModel` per stage, the loss at the last.

Stage 0 holds the embedding, the last stage holds the final norm, the head and the loss. The head is tied to
the token embedding: in one process (`PipelineModel`) they are one Parameter; across machines stage 0 and the
last stage each hold the matrix (``StageModel.tied_name`` names it) and add each other's averaged gradient of it
every step (`swarm.training.tied`), so both apply the same update.
The run's model family (`swarm.model.families`: the tiny GPT, or a `transformers` config) builds the stages.
A stage computes in the run's precision (`swarm.model.precision`): with ``bf16`` its body runs under autocast and
its activations (outputs, and floating inputs) are bfloat16, in one process as across machines.
A user factory ``package.module:function`` may replace the tiny GPT: it is called with the `RunConfig` and
returns ``(list_of_stage_modules, loss_fn)``.
With ``pipeline.activation_bottleneck_ratio`` r > 1, `build_stages` adds a learned bottleneck on every boundary
(`add_bottlenecks`): the sending stage's ``bottleneck_down`` maps its outputs to ``width // r`` features, the
receiving stage's ``bottleneck_up`` maps them back; they are ordinary parameters of their stages (optimized,
averaged, checkpointed, downloaded by joiners) and the receiving stage's `InputSpec` expects the narrow width.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from swarm.compression.bottleneck import BottleneckDown, BottleneckUp, bottleneck_dim
from swarm.run.config import RunConfig
from swarm.errors import ConfigError, SwarmError
from swarm.model.gpt import build_gpt_pieces, lm_loss
from swarm.model.precision import autocast, compute_dtype

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StageInputError(SwarmError):
    """An activation sent to a stage has the wrong shape or dtype; the request is rejected."""

    code = "stage_input"


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """What a stage accepts: dtype, and the shape after the batch dimension (-1 = any length up to max)."""

    dtype: torch.dtype
    tail_shape: tuple[int, ...]
    max_value: int | None = None

    def check(self, x: torch.Tensor, *, stage: int, max_batch: int) -> None:
        """Raise StageInputError unless ``x`` fits this spec."""
        if x.dtype != self.dtype:
            raise StageInputError(f"stage {stage} expects {self.dtype} inputs, got {x.dtype}; check the run config")
        if x.dim() != 1 + len(self.tail_shape) or not 1 <= x.shape[0] <= max_batch:
            raise StageInputError(
                f"stage {stage} expects inputs of shape [1..{max_batch}, {', '.join(map(str, self.tail_shape))}], "
                f"got {list(x.shape)}"
            )
        for got, want in zip(x.shape[1:], self.tail_shape, strict=False):
            if want >= 0 and got != want:
                raise StageInputError(
                    f"stage {stage} expects inputs of shape [B, {', '.join(map(str, self.tail_shape))}], "
                    f"got {list(x.shape)}"
                )
        if self.max_value is not None and x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.max_value):
            raise StageInputError(f"stage {stage} expects token ids in [0, {self.max_value}), got out-of-range ids")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise StageInputError(f"stage {stage} got non-finite activations (NaN or inf); the request is rejected")


class StageModel(nn.Module):
    """One pipeline stage: ``forward(inputs) -> outputs``; the last stage also has ``loss(outputs, targets)``."""

    def __init__(
        self,
        body: nn.Module,
        *,
        index: int,
        num_stages: int,
        input_spec: InputSpec,
        loss_fn: LossFn,
        tied_name: str | None = None,
    ) -> None:
        super().__init__()
        self.activation_dtype = torch.float32  # `build_stages` sets the run's precision (`set_precision`)
        self.tied_name = tied_name  # the parameter shared with another stage (embedding <-> head), if any
        self.body = body
        self.index = index
        self.num_stages = num_stages
        self.input_spec = input_spec
        self._loss_fn = loss_fn
        self.bottleneck_up: nn.Module | None = None  # first: widens the features received (`add_bottlenecks`)
        self.bottleneck_down: nn.Module | None = None  # last: narrows the outputs sent to the next stage

    def attach_bottleneck(self, *, up: BottleneckUp | None = None, down: BottleneckDown | None = None) -> None:
        """Put ``up`` before the body (the stage then accepts ``up``'s narrow features) and ``down`` after it."""
        if up is not None:
            if self.is_first or self.bottleneck_up is not None:
                raise ConfigError(f"stage {self.index} cannot take an up-projection (first stage, or it has one)")
            self.bottleneck_up = up
            tail = (*self.input_spec.tail_shape[:-1], bottleneck_dim(up.dim, up.ratio))
            self.input_spec = dataclasses.replace(self.input_spec, tail_shape=tail)
        if down is not None:
            if self.is_last or self.bottleneck_down is not None:
                raise ConfigError(f"stage {self.index} cannot take a down-projection (last stage, or it has one)")
            self.bottleneck_down = down

    def _compute(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs if self.bottleneck_up is None else self.bottleneck_up(inputs)
        x = self.body(x)
        return x if self.bottleneck_down is None else self.bottleneck_down(x)

    def set_precision(self, dtype: torch.dtype) -> None:
        """Compute in ``dtype`` (float32, or bfloat16 under autocast): the outputs sent to the next stage, and the
        floating inputs this stage accepts, are ``dtype``. The parameters keep their own dtype (float32)."""
        self.activation_dtype = dtype
        if self.input_spec.dtype.is_floating_point:
            self.input_spec = dataclasses.replace(self.input_spec, dtype=dtype)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The stage's outputs. In float32 just the body; in a lower precision the body runs under autocast on
        float32 inputs (the residual stream stays float32 inside the stage), and the outputs are cast to the
        activation dtype, except the last stage's logits, which are float32 (the loss is computed in float32)."""
        if self.activation_dtype == torch.float32:
            return self._compute(inputs)
        x = inputs.float() if inputs.is_floating_point() else inputs
        with autocast(x.device, self.activation_dtype):
            outputs = self._compute(x)
        if not outputs.is_floating_point():
            return outputs
        return outputs.float() if self.is_last else outputs.to(self.activation_dtype)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss (last stage only)."""
        if not self.is_last:
            raise SwarmError(f"stage {self.index} is not the last stage and computes no loss")
        return self._loss_fn(outputs, targets)


class PipelineModel(nn.Module):
    """All stages chained in one process: the single-process model that checkpoints load into."""

    def __init__(self, stages: list[StageModel]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = ids
        for stage in self.stages:
            x = stage(x)
        return x

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        last = cast(StageModel, self.stages[-1])  # nn.ModuleList is not generic: it holds the StageModels given
        return last.loss(self(ids), targets)


def stage_block_ranges(num_blocks: int, num_stages: int) -> list[range]:
    """Contiguous, near-equal block ranges per stage (earlier stages get the extra block)."""
    base, extra = divmod(num_blocks, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        size = base + (1 if i < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def build_stages(cfg: RunConfig) -> list[StageModel]:
    """Every stage of the run with its deterministic initial weights (identical on every node), built by the
    run's model family (`swarm.model.families`)."""
    from swarm.model.families import family_for  # the families build on this module

    stages = family_for(cfg).build_stages(cfg)
    add_bottlenecks(stages, width=cfg.model.width, ratio=cfg.pipeline.activation_bottleneck_ratio, seed=cfg.seed)
    for stage in stages:
        stage.set_precision(compute_dtype(cfg.precision.compute))
    return stages


BOTTLENECK_SEED_SALT = 0xB077_1E4E  # the bottleneck's init draws from seed ^ salt, not from the model's stream


def add_bottlenecks(stages: list[StageModel], *, width: int, ratio: int, seed: int) -> None:
    """Give every boundary a learned bottleneck (``ratio`` 1, or a single stage: none), with deterministic initial
    weights: boundary ``k``'s down-projection goes to stage ``k``, its up-projection to stage ``k + 1``."""
    for stage in stages:
        attach_stage_bottlenecks(stage, width=width, ratio=ratio, seed=seed)


def attach_stage_bottlenecks(stage: StageModel, *, width: int, ratio: int, seed: int) -> None:
    """Give one stage its side of the bottlenecks of its boundaries: each projection's initial weights draw from a
    seed of its own (the run seed, the boundary, the side), so a node that builds only its stage gets the same."""
    if ratio == 1 or stage.num_stages < 2:
        return
    generator_state = torch.random.get_rng_state()
    try:
        if not stage.is_last:
            torch.manual_seed((seed ^ BOTTLENECK_SEED_SALT) + 2 * stage.index)
            stage.attach_bottleneck(down=BottleneckDown(width, ratio))
        if not stage.is_first:
            torch.manual_seed((seed ^ BOTTLENECK_SEED_SALT) + 2 * (stage.index - 1) + 1)
            stage.attach_bottleneck(up=BottleneckUp(width, ratio))
    finally:
        torch.random.set_rng_state(generator_state)


def bottleneck_whole_names(stage: StageModel) -> dict[str, str]:
    """``{stage parameter name: whole-model name}`` of the stage's bottleneck projections: boundary ``k``'s
    down-projection (stage ``k``) is ``bottlenecks.k.down.*``, its up-projection (stage ``k + 1``)
    ``bottlenecks.k.up.*``."""
    names = {}
    for name, _ in stage.named_parameters():
        if name.startswith("bottleneck_down."):
            names[name] = f"bottlenecks.{stage.index}.down.{name[len('bottleneck_down.') :]}"
        elif name.startswith("bottleneck_up."):
            names[name] = f"bottlenecks.{stage.index - 1}.up.{name[len('bottleneck_up.') :]}"
    return names


def gpt_stages(cfg: RunConfig) -> list[StageModel]:
    """The tiny GPT's stages (or the user factory's)."""
    if cfg.model.factory:
        return _stages_from_factory(cfg)
    m = cfg.model
    embedding, blocks, head = build_gpt_pieces(m, cfg.seed)
    n = cfg.pipeline.num_stages
    head.weight = embedding.tokens.weight  # tied (across stages: see swarm.training.tied)
    hidden = InputSpec(dtype=torch.float32, tail_shape=(m.seq_len, m.d_model))
    stages = []
    for i, blocks_range in enumerate(stage_block_ranges(m.num_blocks, n)):
        pieces: list[nn.Module] = [embedding] if i == 0 else []
        pieces += [blocks[b] for b in blocks_range]
        if i == n - 1:
            pieces.append(head)
        spec = InputSpec(dtype=torch.int64, tail_shape=(m.seq_len,), max_value=m.vocab_size) if i == 0 else hidden
        tied = (
            None
            if n == 1
            else "body.0.tokens.weight"
            if i == 0
            else f"body.{len(pieces) - 1}.weight"
            if i == n - 1
            else None
        )
        stages.append(
            StageModel(nn.Sequential(*pieces), index=i, num_stages=n, input_spec=spec, loss_fn=lm_loss, tied_name=tied)
        )
    return stages


def build_stage(cfg: RunConfig, index: int) -> StageModel:
    """One stage of the run, with the weights `build_stages` gives it (the hf family allocates only that stage)."""
    from swarm.model.families import family_for  # the families build on this module

    if not 0 <= index < cfg.pipeline.num_stages:
        raise ConfigError(f"stage must be in [0, {cfg.pipeline.num_stages}), got {index}")
    stage = family_for(cfg).build_stage(cfg, index)
    ratio = cfg.pipeline.activation_bottleneck_ratio
    attach_stage_bottlenecks(stage, width=cfg.model.width, ratio=ratio, seed=cfg.seed)
    stage.set_precision(compute_dtype(cfg.precision.compute))
    return stage


def _stages_from_factory(cfg: RunConfig) -> list[StageModel]:
    module_name, _, func_name = cfg.model.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.factory {cfg.model.factory!r} cannot be imported: {e}") from None
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        modules, loss_fn = factory(cfg)
    finally:
        torch.random.set_rng_state(generator_state)
    if len(modules) != cfg.pipeline.num_stages:
        raise ConfigError(
            f"model.factory returned {len(modules)} stage modules but pipeline.num_stages is {cfg.pipeline.num_stages}"
        )
    m = cfg.model
    stages = []
    for i, module in enumerate(modules):
        spec = getattr(module, "input_spec", None)
        if spec is None:
            spec = (
                InputSpec(dtype=torch.int64, tail_shape=(m.seq_len,), max_value=m.vocab_size)
                if i == 0
                else InputSpec(dtype=torch.float32, tail_shape=(m.seq_len, m.d_model))
            )
        stages.append(StageModel(module, index=i, num_stages=len(modules), input_spec=spec, loss_fn=loss_fn))
    return stages
