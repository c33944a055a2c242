"""The training role's state sync (`StateSync`): joining the run and loading a stage's newest state.

- `check_run_config`: refuse to join a swarm of the same run name whose config differs (by the live signed records
  of the run name: `swarm.training.join_check`);
- `first_stage`: the stage a node with ``stage=None`` starts on (the weakest);
- `become`: serve a stage: read the run's records (with a deadline), build it, then load the newest state the
  step-claim rule believes (a download from another peer of the stage, else this node's own checkpoint unless it is
  far ahead of the swarm, else the swarm's step with the weights it has); never from this node's own record;
- `sync_from`: download a stage's state from a peer and load it;
- checkpoints: `save_checkpoint` writes the served stage to ``checkpoint_dir`` (`become` resumes from it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from swarm.errors import SwarmError
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stage
from swarm.p2p.identity import PeerID
from swarm.training.balancing import StagePeer, choose_stage
from swarm.training.checkpoint import (
    CheckpointError,
    apply_state,
    capture_state,
    extra_state,
    load_state,
    save_state,
)
from swarm.training.records import RunRecords
from swarm.training.stage_rpc import call_state_download
from swarm.training.stage_server import StageServer, StageServerConfig
from swarm.training.state import TrainerState
from swarm.training.verifying import NodeVerification
from swarm.dht.keys import config_key, peers_key
from swarm.training.join_check import check_join, collect_votes
from swarm.training.messages import CONFIG_SCHEMA, PEERS_SCHEMA
from swarm.training.node_role import Role

log = logging.getLogger(__name__)
JOIN_READ_ATTEMPTS = 3  # reads of the run's records on joining (each bounded by dht_timeout_s) before giving up


class StateSync:
    """Joins the run and keeps the served stage's state loaded from the swarm or this node's checkpoint."""

    def __init__(self, state: TrainerState, *, records: RunRecords, checks: NodeVerification) -> None:
        self.state = state
        self.records = records
        self.checks = checks
        self._joined = False  # the first `become` is the node's join (or rejoin) of the run

    async def check_run_config(self) -> None:
        """Refuse to join when a strict majority of the live, owner-signed records of the run name hold another config
        (ConfigError names the field; the rule: `swarm.training.join_check`); then publish this node's config entry."""
        st = self.state
        configs, peers = await self._read_join_records()
        votes = collect_votes(
            CONFIG_SCHEMA.entries(configs),
            PEERS_SCHEMA.entries(peers),
            me=st.me,
            my_hash=st.run_cfg.config_hash(),
            now=time.time(),
        )
        check_join(st.run_cfg, votes)
        await self.records.publish_config()

    async def _read_join_records(self) -> tuple[object, object]:
        """The run name's config entries and the run's peer records; a read that times out (a busy or slow
        swarm) is retried, JOIN_READ_ATTEMPTS times in all, before the node gives up with a SwarmError."""
        st = self.state
        for attempt in range(1, JOIN_READ_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(st.cfg.dht_timeout_s):
                    configs, peers = await asyncio.gather(
                        st.dht.get(config_key(st.run_cfg.name), latest=True),
                        st.dht.get(peers_key(st.run_id), latest=True),
                    )
                return configs, peers
            except TimeoutError:
                log.warning(
                    "%s: reading the run's records timed out after %.1fs (attempt %d of %d)",
                    st.me.short(),
                    st.cfg.dht_timeout_s,
                    attempt,
                    JOIN_READ_ATTEMPTS,
                )
        raise SwarmError(
            f"could not read the run's records from the DHT in {JOIN_READ_ATTEMPTS} attempts of "
            f"{st.cfg.dht_timeout_s:.1f}s; check the initial peers and the network"
        )

    def first_stage(self) -> int | None:
        """The stage to serve on joining: the configured one, else the weakest (None for a trainer)."""
        st = self.state
        if st.cfg.role == Role.TRAINER:
            return None
        if st.cfg.stage is not None:
            return st.cfg.stage
        return choose_stage(
            [
                StagePeer(peer=p.to_base58(), stage=r.stage, throughput=r.throughput or 1.0, relayed=r.relayed)
                for p, r in st.view.peers.items()
                if r.stage is not None
            ],
            st.run_cfg.pipeline.num_stages,
            my_speed=1.0,
            relayed=st.transport.reachability in ("relayed", "private"),
        )

    async def become(self, stage: int) -> None:
        """Serve ``stage``: build it, then load the newest state the step-claim rule believes (a download from
        another peer of the stage, else this node's own checkpoint, else the swarm's step with the weights it
        has). This node's own records never count: they may be a previous life's."""
        st = self.state
        await self.read_records(stage, joining=not self._joined)
        self._joined = True
        server = await self._build(stage)
        offenders = self.checks.offenders()
        evidence = st.step_evidence(offenders)
        if evidence.believed is not None and not evidence.backs(server.step):
            log.warning(
                "%s: the checkpoint of stage %d is at step %d, far ahead of the step %d the run's records back; "
                "not believing it: taking the swarm's state",
                st.me.short(),
                stage,
                server.step,
                evidence.believed,
            )
            server.skip_to(evidence.believed)
        downloaded = await self._download_newest(server, offenders)
        swarm_step = st.swarm_step(offenders)
        if not downloaded and server.step < swarm_step:
            log.warning(
                "%s: stage %d has no peer to download its state from; serving %s weights at the swarm's step %d",
                st.me.short(),
                stage,
                "checkpointed" if server.step else "initial",
                swarm_step,
            )
            server.skip_to(swarm_step)
        st.state_age_steps = 0
        st.server = server
        log.info("%s: serving stage %d of run %s at step %d", st.me.short(), stage, st.run_id, server.step)

    async def read_records(self, stage: int, *, joining: bool) -> None:
        """Read the run's records before deciding where the stage's state comes from: retry a failed read for up to
        ``max(record_period_s, dht_timeout_s)``; and when ``joining`` is a rejoin (a record of this PeerID's
        previous life serves ``stage``, or this node has a checkpoint of it) wait up to ``record_period_s`` for
        another peer of the stage to show up (a live peer re-publishes its record every period)."""
        st = self.state
        started = time.monotonic()
        read_deadline = started + max(st.cfg.record_period_s, st.cfg.dht_timeout_s)
        checkpoint = self.checkpoint_path(stage)
        while True:
            if not await self.records.refresh_view():
                if time.monotonic() >= read_deadline:
                    log.warning(
                        "%s: could not read the run's records within %.1fs; choosing stage %d's state without them",
                        st.me.short(),
                        read_deadline - started,
                        stage,
                    )
                    return
            else:
                mine = st.view.peers.get(st.me)
                rejoin = joining and (
                    (mine is not None and mine.stage == stage) or (checkpoint is not None and checkpoint.exists())
                )
                if not rejoin or any(p != st.me for p in st.view.stage_peers(stage)):
                    return
                if time.monotonic() >= started + st.cfg.record_period_s:
                    log.info("%s: no other peer of stage %d in the run's records", st.me.short(), stage)
                    return
            await asyncio.sleep(st.cfg.poll_interval_s)

    async def _download_newest(self, server: StageServer, offenders: frozenset[PeerID]) -> bool:
        """Download the stage's state from the other peers of the stage the claim rule believes, newest first,
        when they are at least at ``server``'s step (one that fails is skipped). False: none could serve it."""
        st = self.state
        for peer, step in st.stage_sources(server.index, offenders):
            if step < server.step:
                break
            try:
                await self.sync_from(peer, server)
                return True
            except (SwarmError, TimeoutError, OSError) as e:  # e.g. its record outlived it: try the next one
                st.selectors[server.index].report_failure(peer)
                log.warning("%s: state download from %s failed: %s", st.me.short(), peer.short(), e)
        return False

    async def _build(self, stage: int) -> StageServer:
        """A server of ``stage`` with initial weights, or this node's checkpoint of it when there is one."""
        st = self.state
        model = build_stage(st.run_cfg, stage).to(st.cfg.device)
        optimizer = make_optimizer(model.parameters(), st.run_cfg.optimizer)
        server = StageServer(
            model,
            optimizer,
            st.run_cfg.optimizer,
            StageServerConfig(max_batch=st.run_cfg.batch.microbatch_size),
            step=0,
        )
        server.names_weights = st.run_cfg.verification.enabled  # work claims name the weights (local_sgd replays)
        checkpoint = self.checkpoint_path(stage)
        if checkpoint is not None and checkpoint.exists():
            try:
                state = await asyncio.to_thread(load_state, checkpoint)
                apply_state(model, optimizer, state, run_id=st.run_id, stage=stage)
                server.extra_state = extra_state(state)
                server.skip_to(state.step)
                log.info("%s: resumed stage %d at step %d from %s", st.me.short(), stage, state.step, checkpoint)
            except CheckpointError as e:
                log.warning("%s: ignoring checkpoint: %s", st.me.short(), e)
        return server

    async def sync_from(self, peer: PeerID, server: StageServer) -> None:
        """Download ``server``'s stage state from ``peer`` and load it (stops accepting work while loading)."""
        st = self.state
        log.info("%s: downloading stage %d state from %s", st.me.short(), server.index, peer.short())
        state = await call_state_download(
            st.transport, peer, run_id=st.run_id, stage=server.index, timeout_s=st.cfg.rpc_timeout_s
        )

        def load() -> None:
            with server.lock:
                apply_state(server.model, server.optimizer, state, run_id=st.run_id, stage=server.index)
                server.extra_state = extra_state(state)
            server.skip_to(state.step)

        await asyncio.to_thread(load)
        st.state_age_steps = 0
        log.info(
            "%s: stage %d now at step %d (downloaded from %s)", st.me.short(), server.index, state.step, peer.short()
        )

    def checkpoint_path(self, stage: int) -> Path | None:
        """Where ``stage``'s checkpoint lives (None without ``checkpoint_dir``)."""
        directory = self.state.cfg.checkpoint_dir
        return None if directory is None else directory / f"stage-{stage}.safetensors"

    def save_checkpoint(self) -> None:
        """Save the served stage's state to its checkpoint file (nothing without a server or ``checkpoint_dir``)."""
        st = self.state
        server = st.server
        path = None if server is None else self.checkpoint_path(server.index)
        if server is None or path is None:
            return
        with server.lock:
            state = capture_state(
                server.model,
                server.optimizer,
                run_id=st.run_id,
                stage=server.index,
                step=server.step,
                extra=server.extra_state,
            )
        save_state(path, state)
        log.info("%s: saved stage %d at step %d to %s", st.me.short(), server.index, server.step, path)
