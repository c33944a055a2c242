"""`swarm-node export`: gather every stage's parameters from the swarm into one single-process checkpoint.

``format = "hf"`` writes the Hugging Face layout instead (`swarm.local.export_hf`), and ``from_dir`` reads the
stage states offline from a run directory's checkpoints instead of a live swarm.

Joins as a client-mode DHT node, reads the run's stage records, downloads each stage's state (``state.download``)
from the peer of that stage with the newest step, and writes the parameters under the names of
`PipelineModel(build_stages(run)).state_dict()`, so ``load_state_dict`` works on the single-process model.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from swarm.dht import DHT, DHTConfig
from swarm.p2p.maddr import parse_maddr
from swarm.local.export_hf import states_from_run_dir, write_hf
from swarm.training.checkpoint import CheckpointError, StageState
from swarm.run.config import RunConfig
from swarm.configs import Config, setting
from swarm.errors import AddressError, ConfigError, NotFoundError, SwarmError
from swarm.model.stages import PipelineModel, build_stages
from swarm.training.stage_rpc import call_state_download
from swarm.dht.keys import peers_key, progress_key
from swarm.training.schemas import with_run_schemas
from swarm.training.view import SwarmView

log = logging.getLogger(__name__)


EXPORT_FORMATS = ("safetensors", "hf")


class ExportConfig(Config, section="export"):
    """Which run, from which peers (or run directory), to which file or folder, in which format."""

    run: RunConfig = setting(doc="The run whose stages are gathered.")
    initial_peers: tuple[str, ...] = setting(default=(), doc="Multiaddrs of nodes of the swarm.")
    out_path: Path = setting(doc="The single-process checkpoint (safetensors), or the folder (hf).")
    rpc_timeout_s: float = setting(default=10.0, gt=0, le=3600, doc="Deadline of one download.")
    format: str = setting(
        default="safetensors", choices=EXPORT_FORMATS, doc="safetensors (PipelineModel names) or hf (a folder)."
    )
    from_dir: Path | None = setting(default=None, doc="Read the stages from this run directory's checkpoints.")

    def validate(self) -> None:
        if not self.initial_peers and self.from_dir is None:
            raise ConfigError(
                "export.initial_peers: give at least one multiaddr of a node of the swarm (or a run directory)"
            )
        if self.initial_peers and self.from_dir is not None:
            raise ConfigError("export.from_dir: give either a run directory or initial peers, not both")


def export_model(cfg: ExportConfig) -> list[int]:
    """Gather every stage (download, or from ``from_dir``) and write the export; the step of each stage's state."""
    if cfg.from_dir is None:
        return asyncio.run(_export(cfg))
    states = states_from_run_dir(cfg.run, cfg.from_dir)
    write_export(cfg, states)
    return [s.step for s in states]


def write_export(cfg: ExportConfig, states: list[StageState]) -> None:
    """Write ``states`` in ``cfg.format`` to ``cfg.out_path``."""
    if cfg.format == "hf":
        write_hf(cfg.run, states, cfg.out_path)
    else:
        write_checkpoint(cfg.run, states, cfg.out_path)


async def _export(cfg: ExportConfig) -> list[int]:
    dht_cfg = with_run_schemas(
        DHTConfig(
            initial_peers=cfg.initial_peers,
            client_mode=True,
            rpc_timeout_s=min(cfg.rpc_timeout_s, 5.0),
            lookup_timeout_s=max(8.0, cfg.rpc_timeout_s),
            maintenance_interval_s=3600.0,
        )
    )
    async with DHT.create(dht_cfg) as dht:
        states = await gather_stages(dht, cfg.run, rpc_timeout_s=cfg.rpc_timeout_s)
    await asyncio.to_thread(write_export, cfg, states)
    return [s.step for s in states]


async def gather_stages(dht: DHT, run: RunConfig, *, rpc_timeout_s: float) -> list[StageState]:
    """Each stage's state, from the peer with the newest step (falling back to the others)."""
    async with asyncio.timeout(rpc_timeout_s):
        view = SwarmView.parse(
            await dht.get(peers_key(run.run_id), latest=True), await dht.get(progress_key(run.run_id), latest=True)
        )
    for peer, record in view.peers.items():
        try:
            dht.transport.add_addresses(peer, [parse_maddr(m) for m in record.maddrs])
        except AddressError as e:
            log.warning("stage record of %s has a bad address: %s", peer.short(), e)
    states = []
    for stage in range(run.pipeline.num_stages):
        candidates = sorted(view.stage_peers(stage), key=lambda p: -view.peers[p].step)
        if not candidates:
            raise NotFoundError(f"no peer serves stage {stage} of run {run.run_id}; start one, then export again")
        for peer in candidates:
            try:
                states.append(
                    await call_state_download(
                        dht.transport, peer, run_id=run.run_id, stage=stage, timeout_s=rpc_timeout_s
                    )
                )
                break
            except (SwarmError, TimeoutError, OSError) as e:
                log.warning("state of stage %d from %s failed: %s; trying another peer", stage, peer.short(), e)
        else:
            raise NotFoundError(f"no peer of stage {stage} sent its state; retry later")
    return states


def write_checkpoint(run: RunConfig, states: list[StageState], out_path: Path) -> None:
    """Load the stage states into the single-process model and save its state dict (safetensors)."""
    stages = build_stages(run)
    model = PipelineModel(stages)
    params = dict(model.named_parameters())  # the tied matrix once, under its stage-0 name
    with torch.no_grad():
        for state in states:
            prefix = f"stages.{state.stage}."
            for key, value in state.tensors.items():
                if not key.startswith("param."):
                    continue
                if state.stage > 0 and key == f"param.{stages[state.stage].tied_name}":
                    continue  # the last stage's copy of the tied matrix: stage 0's copy is the one kept
                name = prefix + key[len("param.") :]
                if name not in params or params[name].shape != value.shape:
                    raise CheckpointError(f"stage {state.stage} sent {key} {list(value.shape)}, which the model lacks")
                params[name].copy_(value)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"run_id": run.run_id, "steps": ",".join(str(s.step) for s in states)})
    tmp.replace(out_path)
