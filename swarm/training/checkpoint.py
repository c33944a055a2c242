"""Stage state on disk and on the wire: parameters + optimizer state as a flat tensor dict, saved atomically.

A stage's state is ``param.<name>`` for each parameter and ``optim.<param index>.<key>`` for each tensor of
the optimizer's per-parameter state, plus ``outer.*`` tensors in local_sgd mode (`swarm.training.outer_sync`)
and ``delayed.*`` ones with delayed updates (`swarm.training.delayed`); the step, stage and run id travel as
safetensors metadata. Files are
written to a temporary name in the same folder, fsynced, then renamed over the old file, so a crash never
leaves a torn checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from swarm.errors import SwarmError

log = logging.getLogger(__name__)

# tensors besides the model's and the optimizer's: the local_sgd outer optimizer's (``outer.``), and a delayed
# update's averaged gradients still to apply (``delayed.``, `swarm.training.delayed`)
EXTRA_PREFIXES = ("outer.", "delayed.")


class CheckpointError(SwarmError):
    """A checkpoint or downloaded state does not match this stage (other run, stage or shapes), or is corrupt."""

    code = "checkpoint"


@dataclass(frozen=True, kw_only=True)
class StageState:
    """What a stage needs to resume: its tensors (parameters and optimizer state) and its step."""

    run_id: str
    stage: int
    step: int
    tensors: dict[str, torch.Tensor]


def capture_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    run_id: str,
    stage: int,
    step: int,
    extra: Mapping[str, torch.Tensor] = {},
) -> StageState:
    """A detached copy of the model's parameters and the optimizer's tensors (and ``extra``: ``outer.*`` and
    ``delayed.*`` tensors)."""
    tensors = {f"param.{name}": p.detach().cpu().clone().contiguous() for name, p in model.named_parameters()}
    for key, value in extra.items():
        if not key.startswith(EXTRA_PREFIXES):
            raise CheckpointError(f"extra state tensor {key!r} must start with one of {EXTRA_PREFIXES}")
        tensors[key] = value.detach().cpu().clone().contiguous()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            tensors[f"optim.{index}.{key}"] = value.detach().cpu().clone().contiguous()
    return StageState(run_id=run_id, stage=stage, step=step, tensors=tensors)


def extra_state(state: StageState) -> dict[str, torch.Tensor]:
    """The ``outer.*`` and ``delayed.*`` tensors of ``state`` (what `capture_state` took as ``extra``)."""
    return {k: v.clone() for k, v in state.tensors.items() if k.startswith(EXTRA_PREFIXES)}


def apply_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: StageState, *, run_id: str, stage: int
) -> None:
    """Load ``state`` into the model and optimizer; CheckpointError if it belongs elsewhere or misfits."""
    if state.run_id != run_id or state.stage != stage:
        raise CheckpointError(
            f"state is for run {state.run_id!r} stage {state.stage}, this node serves run {run_id!r} stage {stage}; "
            "delete the stale checkpoint or start with the matching run config"
        )
    named = dict(model.named_parameters())
    expected = {f"param.{name}" for name in named}
    missing = expected - set(state.tensors)
    if missing:
        raise CheckpointError(f"state lacks parameters {sorted(missing)[:5]}; it is not a state of this stage")
    for name, p in named.items():
        value = state.tensors[f"param.{name}"]
        if value.shape != p.shape or value.dtype != p.dtype:
            raise CheckpointError(
                f"parameter {name}: state has {list(value.shape)} {value.dtype}, model {list(p.shape)} {p.dtype}"
            )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optim_state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for key, value in state.tensors.items():
        if not key.startswith("optim."):
            continue
        _, index_text, slot = key.split(".", 2)
        index = int(index_text)
        if not 0 <= index < len(params):
            raise CheckpointError(f"optimizer state names parameter {index}, the stage has {len(params)}")
        optim_state.setdefault(params[index], {})[slot] = (
            value.clone() if value.dim() == 0 else value.to(params[index].device, copy=True)
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state.tensors[f"param.{name}"])
    optimizer.state.clear()
    for p, slots in optim_state.items():
        optimizer.state[p] = slots


def save_state(path: str | Path, state: StageState) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"run_id": state.run_id, "stage": str(state.stage), "step": str(state.step)}
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state.tensors, tmp_name, metadata=metadata)
        with open(tmp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_state(path: str | Path) -> StageState:
    """Read a state written by `save_state`; CheckpointError if it is missing pieces or corrupt."""
    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        return StageState(
            run_id=metadata["run_id"], stage=int(metadata["stage"]), step=int(metadata["step"]), tensors=tensors
        )
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); delete it to start fresh"
        ) from None
