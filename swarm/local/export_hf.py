"""Export in the Hugging Face layout, and stage states read offline from a run directory's checkpoints.

`write_hf` loads the stage states into the run's `transformers` model (the ``hf`` family's whole-model names,
`swarm.model.families`) and writes it with ``save_pretrained``: ``config.json``, ``generation_config.json`` and
``model.safetensors``, which ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads. The tied
embedding/head matrix is taken from stage 0. A run trained on token shards also gets its tokenizer (`tokenizer_file`,
saved as a `transformers` fast tokenizer).

A run with a learned activation bottleneck (``pipeline.activation_bottleneck_ratio`` > 1) is refused: a
`transformers` model has no place for the projections, and folding them away is not exact (the down-projection
cuts the residual stream to ``width // r`` features, which no layer of the original architecture does). Such a
run exports with ``--format safetensors``, whose single-process model (`swarm.model.stages.PipelineModel`) keeps
them under ``stages.<k>.bottleneck_down.*`` and ``stages.<k>.bottleneck_up.*``.

`states_from_run_dir` finds ``stage-<k>.safetensors`` under ``RUN_DIR/**/checkpoints/<run id>/`` (where
`swarm-node local` puts each node's checkpoints) and keeps, per stage, the one with the newest step.
"""

from __future__ import annotations

import logging
from pathlib import Path

from swarm.data.binding import manifest_path
from swarm.data.manifest import load_manifest
from swarm.data.tokenizer import END_OF_TEXT
from swarm.errors import ConfigError, NotFoundError
from swarm.model.families import family_for, merge_stage_tensors
from swarm.model.hf import build_hf_model
from swarm.model.stages import build_stages
from swarm.run.config import RunConfig
from swarm.training.checkpoint import CheckpointError, StageState, load_state

log = logging.getLogger(__name__)


def tokenizer_file(run: RunConfig) -> Path | None:
    """The run's ``tokenizer.json``: the one its token-shard manifest names (``data.source`` ``shards`` or
    ``stdlib``); None for a run without a tokenizer (Markov or byte-level text data)."""
    if run.data.source not in ("shards", "stdlib"):
        return None
    manifest = load_manifest(manifest_path(run))
    return manifest.folder / manifest.tokenizer_file


def write_tokenizer(path: Path, out_dir: Path) -> None:
    """Save ``path`` beside the model as a `transformers` fast tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``), so ``AutoTokenizer.from_pretrained(out_dir)`` loads it; ``<|endoftext|>`` (id 0 of a
    `swarm-data` tokenizer) is its end-of-text and padding token."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)
    tokenizer.save_pretrained(str(out_dir))


def write_hf(run: RunConfig, states: list[StageState], out_dir: Path) -> None:
    """Write the run's model in the Hugging Face layout to ``out_dir`` (created; existing files replaced)."""
    if run.model.family != "hf":
        raise ConfigError(
            "export --format hf needs a run with model.family = 'hf' (a transformers config); the tiny GPT exports "
            "with --format safetensors"
        )
    if run.pipeline.activation_bottleneck_ratio > 1:
        raise ConfigError(
            f"export --format hf cannot hold the run's learned activation bottleneck (pipeline."
            f"activation_bottleneck_ratio = {run.pipeline.activation_bottleneck_ratio}): a transformers model has no "
            "place for it and folding it away is not exact; export with --format safetensors, which keeps it"
        )
    stages = build_stages(run)
    names = family_for(run).whole_names(run, stages)
    by_stage = {state.stage: state for state in states}
    if sorted(by_stage) != list(range(len(stages))):
        raise CheckpointError(f"need the state of every stage 0..{len(stages) - 1}, got stages {sorted(by_stage)}")
    per_stage = []
    for index, stage_names in enumerate(names):
        tensors = by_stage[index].tensors
        try:
            per_stage.append({name: tensors[f"param.{name}"] for name in stage_names})
        except KeyError as e:
            raise CheckpointError(
                f"the state of stage {index} lacks parameter {e}; is it a state of this run?"
            ) from None
    whole = merge_stage_tensors(names, per_stage)
    model = build_hf_model(run.model.hf_dict(), run.seed)
    missing, unexpected = model.load_state_dict(whole, strict=False)
    tied = set() if not getattr(model.config, "tie_word_embeddings", False) else {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"the stage states do not fit the model: missing {missing}, unexpected {unexpected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer = tokenizer_file(run)
    if tokenizer is not None:
        write_tokenizer(tokenizer, out_dir)
    log.info("wrote %s in the Hugging Face layout (stage steps %s)", out_dir, [s.step for s in states])


def states_from_run_dir(run: RunConfig, run_dir: Path) -> list[StageState]:
    """Each stage's newest checkpoint of ``run`` under ``run_dir``; NotFoundError names a stage with none."""
    if not run_dir.is_dir():
        raise NotFoundError(f"run directory {str(run_dir)!r} does not exist")
    newest: dict[int, StageState] = {}
    for path in sorted(run_dir.glob(f"**/checkpoints/{run.run_id}/stage-*.safetensors")):
        try:
            state = load_state(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            continue
        if state.run_id == run.run_id and (state.stage not in newest or state.step > newest[state.stage].step):
            newest[state.stage] = state
    for stage in range(run.pipeline.num_stages):
        if stage not in newest:
            raise NotFoundError(
                f"no checkpoint of stage {stage} of run {run.run_id} under {run_dir} (looked for "
                f"**/checkpoints/{run.run_id}/stage-{stage}.safetensors); pass the run's --config and its run directory"
            )
    return [newest[stage] for stage in range(run.pipeline.num_stages)]
