"""The ``hf`` model family: a `transformers` causal LM built from its config, cut at decoder-layer boundaries.

The model is built from the run's config on the ``meta`` device (no memory, no hub download, ever); only the
pieces a node needs are then allocated and initialized: a node serving one stage (`HfFamily.build_stage`) holds
that stage's pieces and nothing else, so an 8B model's stage fits where the whole model would not. Stage 0 holds
the token (and, GPT-2, position) embeddings and the first layers, middle stages layers, the last stage the last
layers, the final norm and the LM head. Each module is initialized by `transformers`' own ``_init_weights`` under
a seed derived from the run seed and the module's name in the whole model, so its weights are the same whichever
subset of the model a node builds. Nothing but the hidden
states crosses a stage boundary: each stage computes its own position ids (``0..L-1``) and rotary cos/sin from
the sequence length, and attention is causal inside every layer (the ``sdpa`` attention with no mask, which
`transformers` runs with ``is_causal``). With ``tie_word_embeddings`` the LM head is the embedding matrix: one
Parameter in one process, and across machines the tied exchange (`swarm.training.tied`) keeps the copies of
stage 0 (``body.embed.weight``) and the last stage (``body.lm_head.weight``) equal.
A run's activation bottleneck (`swarm.model.stages.add_bottlenecks`) is no part of the `transformers` model: its
whole-model names are ``bottlenecks.<boundary>.{down,up}.*``, and the Hugging Face export refuses such a run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from swarm.errors import ConfigError
from swarm.model.gpt import lm_loss
from swarm.model.stages import InputSpec, StageModel, bottleneck_whole_names, stage_block_ranges
from swarm.run.config import RunConfig
from swarm.run.hf_config import hf_get


def hf_transformers_config(data: dict[str, Any]) -> Any:
    """The `transformers` config object of a config dict, with the attention set to ``sdpa`` (causal, no mask)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("model.family 'hf' needs transformers: pip install 'swarm-p2p[hf]'") from None
    fields = dict(data)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = "sdpa"
    return config


def module_seed(seed: int, name: str) -> int:
    """The init seed of the module called ``name`` in the whole model, for the run seed ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") & ((1 << 63) - 1)


def build_hf_model(data: dict[str, Any], seed: int, *, stage: tuple[int, int] | None = None) -> Any:
    """The causal LM with deterministic fp32 weights: every node building it with ``seed`` gets the same.

    ``stage=(index, num_stages)`` allocates only that stage's pieces; the rest of the model stays on the ``meta``
    device (shapes, no storage). None allocates all of it.
    """
    from transformers import AutoModelForCausalLM

    config = hf_transformers_config(data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    keep = _stage_modules(model, *stage) if stage is not None else [model]
    names = {id(m): name for name, m in model.named_modules()}
    for root in keep:
        for module in root.modules():
            if next(module.parameters(recurse=False), None) is None or not _on_meta(module):
                continue
            module.to_empty(device="cpu", recurse=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_seed(seed, names[id(module)]))
                model._init_weights(module)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # allocating broke the tie: the head is the embedding matrix again
    base: Any = model.base_model
    if getattr(base, "rotary_emb", None) is not None:  # its buffers were never allocated: computed anew
        base.rotary_emb = type(base.rotary_emb)(config=config)
    return model.float()


def _on_meta(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters(recurse=False))


def _stage_modules(model: Any, index: int, num_stages: int) -> list[nn.Module]:
    """The modules stage ``index`` of ``num_stages`` holds (the embedding too on a last stage whose head is tied)."""
    parts = _parts(model)
    layers = parts["layers"]
    keep: list[nn.Module] = [layers[b] for b in stage_block_ranges(len(layers), num_stages)[index]]
    if index == 0:
        keep += [parts["embed"], *([parts["positions"]] if parts.get("positions") is not None else [])]
    if index == num_stages - 1:
        keep += [parts["norm"], model.get_output_embeddings()]
        if getattr(model.config, "tie_word_embeddings", False):
            keep.append(parts["embed"])
    return keep


class HfStageBody(nn.Module):
    """The pieces of one stage; ``forward`` maps token ids (stage 0) or hidden states to hidden states (or logits).

    ``whole_names`` maps each of its parameter names to the name `transformers` gives it in the whole model.
    """

    def __init__(
        self,
        *,
        layers: Sequence[nn.Module],
        rotary: nn.Module | None,
        embed: nn.Module | None = None,
        positions: nn.Module | None = None,
        dropout: nn.Module | None = None,
        norm: nn.Module | None = None,
        lm_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.positions = positions
        self.dropout = dropout
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotary = rotary
        self.whole_names: dict[str, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        position_ids = torch.arange(length, device=x.device).unsqueeze(0)
        h = x
        if self.embed is not None:
            h = self.embed(x)
            if self.positions is not None:
                h = h + self.positions(position_ids)
            if self.dropout is not None:
                h = self.dropout(h)
        kwargs: dict[str, Any] = {}
        if self.rotary is not None:
            kwargs = {"position_ids": position_ids, "position_embeddings": self.rotary(h, position_ids)}
        for layer in self.layers:
            out = layer(h, attention_mask=None, **kwargs)
            h = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h


def _parts(model: Any) -> dict[str, Any]:
    """The pieces of a supported causal LM: Llama/Qwen keep them in ``model.model``, GPT-2 in ``model.transformer``."""
    base: Any = model.base_model
    if hasattr(base, "h"):  # GPT-2
        return {"embed": base.wte, "positions": base.wpe, "dropout": base.drop, "layers": base.h, "norm": base.ln_f}
    return {"embed": base.embed_tokens, "layers": base.layers, "norm": base.norm, "rotary": base.rotary_emb}


class HfFamily:
    """`ModelFamily` of ``[model] family = "hf"``."""

    name = "hf"

    def build_stages(self, run: RunConfig) -> list[StageModel]:
        model = build_hf_model(run.model.hf_dict(), run.seed)
        return [_stage(run, model, i) for i in range(run.pipeline.num_stages)]

    def build_stage(self, run: RunConfig, index: int) -> StageModel:
        model = build_hf_model(run.model.hf_dict(), run.seed, stage=(index, run.pipeline.num_stages))
        return _stage(run, model, index)

    def whole_names(self, run: RunConfig, stages: Sequence[StageModel]) -> list[dict[str, str]]:
        return [
            {**{f"body.{k}": v for k, v in _body(stage).whole_names.items()}, **bottleneck_whole_names(stage)}
            for stage in stages
        ]


def _stage(run: RunConfig, model: Any, index: int) -> StageModel:
    """Stage ``index`` of ``model`` (whose pieces of that stage are allocated)."""
    parts = _parts(model)
    whole = {id(p): name for name, p in model.named_parameters()}  # the tied matrix under its embedding name
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    n = run.pipeline.num_stages
    first, last = index == 0, index == n - 1
    body = HfStageBody(
        layers=[parts["layers"][b] for b in stage_block_ranges(len(parts["layers"]), n)[index]],
        rotary=parts.get("rotary"),
        embed=parts["embed"] if first else None,
        positions=parts.get("positions") if first else None,
        dropout=parts.get("dropout") if first else None,
        norm=parts["norm"] if last else None,
        lm_head=model.get_output_embeddings() if last else None,
    )
    body.whole_names = {name: whole[id(p)] for name, p in body.named_parameters()}
    width = int(hf_get(run.model.hf_dict(), "hidden_size"))
    spec = (
        InputSpec(dtype=torch.int64, tail_shape=(run.model.seq_len,), max_value=run.model.vocab_size)
        if first
        else InputSpec(dtype=torch.float32, tail_shape=(run.model.seq_len, width))
    )
    tied_name = None if n == 1 or not tied else "body.embed.weight" if first else "body.lm_head.weight"
    return StageModel(
        body,
        index=index,
        num_stages=n,
        input_spec=spec,
        loss_fn=lm_loss,
        tied_name=tied_name if first or last else None,
    )


def _body(stage: StageModel) -> HfStageBody:
    if not isinstance(stage.body, HfStageBody):
        raise ConfigError(f"stage {stage.index} is not a stage of an hf model")
    return stage.body
