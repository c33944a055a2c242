"""The training role's replica consistency (`Replicas`): the replicas of a stage hold bit-identical weights.

The all-reduce averages gradients, so two replicas whose weights differ stay apart for good. Each step:

- every replica states a SHA-256 of its stage's weights before the step (`digest`) in its averaging entry, and
  the group's majority decides which weights are the stage's (`swarm.averaging.digests.digest_majority`);
- a replica whose digest lost downloads the next step's state from a majority member instead of applying its own
  update (`settle`); after averaging alone, a replica adopts the reference replica's next state
  (`adopt_reference_state`, the smallest PeerID keeps its own);
- a replica that lost the vote and could not download a majority member's state for `MAX_DIVERGED_STEPS`
  steps in a row stops serving: it leaves the stage's peer records and ends the role with
  `ReplicaDivergedError`, which says why.

In local_sgd mode replicas differ between outer syncs by design: `swarm.training.outer_sync` runs this rule at
syncs only, on the replicas' anchors (their weights at the last sync).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from swarm.averaging.digests import DigestVerdict, weights_digest
from swarm.errors import SwarmError
from swarm.p2p.identity import PeerID
from swarm.training.records import RunRecords
from swarm.training.stage_server import StageServer
from swarm.training.state import TrainerState
from swarm.training.sync import StateSync
from swarm.training.verifying import NodeVerification

log = logging.getLogger(__name__)

MAX_DIVERGED_STEPS = 3  # steps in a row a replica may lose the digest vote without reconciling


class ReplicaDivergedError(SwarmError):
    """This replica's weights differ from the majority of its stage's replicas and it could not download theirs."""

    code = "replica_diverged"


class Replicas:
    """Keeps the served stage's weights equal to the majority of its replicas (see the module docstring)."""

    def __init__(self, state: TrainerState, *, records: RunRecords, sync: StateSync, checks: NodeVerification) -> None:
        self.state = state
        self.records = records
        self.sync = sync
        self.checks = checks

    async def digest(self, server: StageServer) -> bytes:
        """SHA-256 of ``server``'s weights (every parameter, in order), taken under its lock in a worker thread."""

        def compute() -> bytes:
            with server.lock:
                return weights_digest(p for _, p in server.model.named_parameters())

        return await asyncio.to_thread(compute)

    async def settle(self, server: StageServer, next_step: int, verdict: DigestVerdict | None) -> bool:
        """After averaging the step before ``next_step``: True when this replica took a peer's state of
        ``next_step`` instead of applying its own update (its digest lost the vote, or it averaged alone).
        ReplicaDivergedError when it lost the vote and could not reconcile for `MAX_DIVERGED_STEPS` steps."""
        st = self.state
        if verdict is not None and not verdict.agrees(st.me):
            log.warning(
                "%s: stage %d step %d: this replica's weights differ from the majority of %d replica(s) (digest %s, "
                "majority %s); downloading a majority member's state instead of applying the step",
                st.me.short(),
                server.index,
                next_step - 1,
                len(verdict.holders),
                "?" if not st.last_digest else st.last_digest.hex()[:8],
                verdict.majority.hex()[:8],
            )
            if await self.adopt(server, next_step, verdict.holders):
                st.diverged_steps, st.needs_sync = 0, False
                return True
            st.diverged_steps += 1
            if st.diverged_steps >= MAX_DIVERGED_STEPS:
                await self.leave(server, verdict)
            return False
        if verdict is not None:
            # the group voted and this replica's weights are the majority's: they are the state the others
            # adopt, so an earlier lone round no longer calls for adopting a peer's (both waiting on each other
            # would stall the stage, and the dissenter would give up)
            st.diverged_steps, st.needs_sync = 0, False
            return False
        return st.needs_sync and await self.adopt_reference_state(server, next_step)

    async def adopt(self, server: StageServer, next_step: int, sources: Sequence[PeerID]) -> bool:
        """Load the state of ``next_step`` (or later) from the first of ``sources`` whose record reaches it and
        whose step the claim rule believes, waiting up to ``behind_grace_s`` for one to get there; each source
        is tried once. False: none did."""
        st = self.state
        deadline = time.monotonic() + st.cfg.behind_grace_s
        tried: set[PeerID] = set()
        while True:
            offenders = self.checks.offenders()  # never adopt the state of a peer caught cheating
            evidence = st.step_evidence(offenders)
            for peer in sources:
                record = st.view.peers.get(peer)
                if peer == st.me or peer in offenders or peer in tried or record is None:
                    continue
                if record.stage != server.index or record.step < next_step or not evidence.backs(record.step):
                    continue
                tried.add(peer)
                try:
                    await self.sync.sync_from(peer, server)
                    return True
                except (SwarmError, TimeoutError, OSError) as e:
                    st.selectors[server.index].report_failure(peer)
                    log.warning("%s: state download from %s failed: %s", st.me.short(), peer.short(), e)
            if time.monotonic() >= deadline or tried >= set(sources) - {st.me}:
                return False
            await st.wait_change(st.cfg.poll_interval_s)

    async def adopt_reference_state(self, server: StageServer, next_step: int) -> bool:
        """After averaging alone, at the step boundary: load the state of ``next_step`` from a peer of the stage
        (the one with the smallest PeerID first) instead of applying this node's own update, so the replicas meet
        again. The reference replica (smallest PeerID) keeps its own. False: apply the own update (no peer got
        there within ``behind_grace_s``; the next boundary tries again)."""
        st = self.state
        offenders = self.checks.offenders()
        peers = sorted((p for p in st.view.stage_peers(server.index) if p not in offenders), key=lambda p: p.to_bytes())
        if not peers or peers[0] == st.me:
            st.needs_sync = False
            return False
        if await self.adopt(server, next_step, peers):
            st.needs_sync = False
            return True
        log.warning(
            "%s: no peer of stage %d reached step %d within %.1fs; applying own update",
            st.me.short(),
            server.index,
            next_step,
            st.cfg.behind_grace_s,
        )
        return False

    async def leave(self, server: StageServer, verdict: DigestVerdict) -> None:
        """Stop serving the stage (the peer record says so at once) and end the role with the reason."""
        st = self.state
        holders = ", ".join(p.short() for p in verdict.holders)
        why = (
            f"stage {server.index}: this replica's weights differed from the majority of its replicas for "
            f"{st.diverged_steps} steps in a row and no majority member ({holders}) "
            "let it download their state; it stopped serving rather than train diverged weights. Restart the node "
            "(it downloads the stage's state when it joins), or check its connectivity to its stage peers"
        )
        log.error("%s: %s", st.me.short(), why)
        await asyncio.to_thread(server.close_step)
        st.server = None
        await self.records.publish_record()
        raise ReplicaDivergedError(why)
