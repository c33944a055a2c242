"""The training role's step machinery (`Stepper`): when a step closes, averaging, catching up.

When the samples of the stage server's step (this node's own plus the others' progress records) reach the target
batch size, `finish_step` closes it, averages the mean gradients with the stage's peers (weighted by samples, each
member stating a digest of its weights), adds the other stage's part of the tied matrix's gradient and applies the
optimizer, unless `swarm.training.replicas.Replicas` takes a peer's next state instead (this replica's digest lost
the vote, or it averaged alone). `catch_up` downloads the state of a peer ahead, or jumps to the swarm's step when no
peer of the stage is ahead; both only go as far as the step-claim rule (`swarm.training.claims`) believes, and peers
whose claims fail it are reported. In local_sgd mode (run config ``[averaging]``) `swarm.training.outer_sync.OuterSync`
closes the step instead: an inner step, and every ``inner_steps`` steps an outer sync.
"""

from __future__ import annotations

import asyncio
import logging
import time


from swarm.averaging import Averager
from swarm.averaging.digests import DigestVerdict, digest_majority
from swarm.dht.keys import averaging_group_key
from swarm.errors import SwarmError
from swarm.p2p.identity import PeerID
from swarm.training.ahead import AheadAnnouncer
from swarm.training.claims import StepEvidence
from swarm.training.delayed import ClosedStep, DelayedUpdate, Pending
from swarm.training.outer_sync import OuterSync
from swarm.training.records import RunRecords
from swarm.training.replicas import Replicas
from swarm.training.stage_server import StageServer
from swarm.training.state import TrainerState
from swarm.training.sync import StateSync
from swarm.training.tied import TiedService, tied_index
from swarm.training.verifying import NodeVerification

log = logging.getLogger(__name__)


class Stepper:
    """Closes, averages and applies the stage server's steps and keeps it in step with the swarm."""

    def __init__(
        self,
        state: TrainerState,
        *,
        records: RunRecords,
        sync: StateSync,
        checks: NodeVerification,
        averager: Averager,
        tied: TiedService,
    ) -> None:
        self.state = state
        self.records = records
        self.sync = sync
        self.checks = checks
        self.averager = averager
        self.tied = tied
        self.replicas = Replicas(state, records=records, sync=sync, checks=checks)
        self.ahead = AheadAnnouncer(state, averager=averager, replicas=self.replicas)  # matchmaking as a step opens
        # local_sgd mode: inner steps and outer syncs instead of every-step averaging
        self.outer: OuterSync | None = None
        if state.run_cfg.averaging.local_sgd:
            self.outer = OuterSync(state, checks=checks, averager=averager, tied=tied, replicas=self.replicas)
        # delayed_update: the all-reduce of a step runs while the next one computes (swarm.training.delayed)
        self.delayed: DelayedUpdate | None = None
        if state.run_cfg.averaging.delayed_update:
            self.delayed = DelayedUpdate(state, replicas=self.replicas, average_round=self.average_round)

    async def step_loop(self) -> None:
        """Forever: on each change, close the served step once its samples reach the target, else catch up."""
        st = self.state
        try:
            while True:
                await st.wait_change(st.cfg.poll_interval_s)
                server = st.server
                if server is None:
                    continue
                if st.step_samples(server.step) >= st.run_cfg.batch.target_batch_size:
                    await self.finish_step(server)
                else:
                    await self.catch_up(server)
                if st.server is not None and self.outer is None:
                    await self.ahead.announce(st.server, self.checks.confirmed_offenders())
        finally:
            if self.delayed is not None:  # a round still running in the background ends with the loop
                await self.delayed.cancel()

    async def finish_step(self, server: StageServer) -> None:
        """Close the step, average mean gradients with the stage's peers, apply the optimizer (or take the
        majority's state), save."""
        st = self.state
        step = server.step
        closed = time.monotonic()
        await asyncio.to_thread(server.close_step)
        await self.records.publish_final_part(step, closed=True)
        if self.outer is not None:  # local_sgd: no all-reduce but every inner_steps (swarm.training.outer_sync)
            await self.outer.finish_step(server, step)
            st.notify()
            st.record_step_time(step)
            if server.step % st.cfg.save_every_steps == 0:
                await asyncio.to_thread(self.sync.save_checkpoint)
            await self.records.publish_record()
            return
        grads = self.checks.hooks.gradients_to_average(step, await asyncio.to_thread(server.mean_gradients))
        offenders = self.checks.offenders()  # caught here or by a quorum: left out of this node's span
        tied_peers = self._tied_peers(server, offenders)
        digest = b""  # of the weights that computed the step, stated to the averaging group (none: no group)
        if self.ahead.expected(server, self.checks.confirmed_offenders()):
            announced = self.ahead.digest_of(server)  # taken as the step opened (the weights are the same)
            digest = announced if announced is not None else await self.replicas.digest(server)
        closed_step = ClosedStep(
            step=step,
            grads=grads,
            offenders=offenders,
            tied_peers=tied_peers,
            digest=digest,
            weight=max(float(server.samples), 1e-3),
            age_steps=st.state_age_steps,
        )
        if self.delayed is not None:  # the previous step's average applied, this one's averaged in the background
            waited_s, applied_s = await self.delayed.finish_step(server, closed_step)
            phases = f"{waited_s:.3f}s waiting for step {step - 1}'s average, {applied_s:.3f}s applying"
        else:
            phases = await self._average_and_apply(server, closed_step)
        st.notify()
        st.record_step_time(step)
        now = time.monotonic()
        elapsed, st.step_opened = now - st.step_opened, now
        log.info(
            "%s: stage %d step %d done (%d samples served in all; %.2fs: %.2fs feeding, %s)",
            st.me.short(),
            server.index,
            step,
            server.total_samples,
            elapsed,
            closed - (now - elapsed),
            phases,
        )
        if server.step % st.cfg.save_every_steps == 0:
            await asyncio.to_thread(self.sync.save_checkpoint)
        await self.records.publish_record_soon()  # the DHT copy of the new step: nobody waits for it

    async def _average_and_apply(self, server: StageServer, closed: ClosedStep) -> str:
        """Average the closed step's gradients, add the tied part, apply the optimizer (or take the majority's
        state); returns the time each phase took, for the step's log line."""
        st = self.state
        started = time.monotonic()
        done = await self.average_round(server, closed)
        tied_done = time.monotonic()
        if not await self.replicas.settle(server, closed.step + 1, done.verdict):
            await asyncio.to_thread(server.apply_step, done.grads, replace=done.replace)
            st.state_age_steps += 1
        now = time.monotonic()
        tied_s = tied_done - started - done.averaged_s
        return f"{done.averaged_s:.3f}s averaging, {tied_s:.3f}s tied, {now - tied_done:.3f}s optimizer"

    async def average_round(self, server: StageServer, closed: ClosedStep) -> Pending:
        """Average the closed step's gradients (in place) with the stage's peers and add the other stage's part of
        the tied matrix's gradient, asked while this stage averages."""
        step, grads, tied_peers = closed.step, closed.grads, closed.tied_peers
        started = time.monotonic()
        async with self.tied.prefetch(server, step, grads, tied_peers) as early:
            verdict = await self._average(server, closed)
            averaged_s = time.monotonic() - started
            retie = (await self.tied.combine(server, step, grads, tied_peers, early)).replace
        return Pending(step=step, grads=grads, replace=retie, verdict=verdict, averaged_s=averaged_s)

    async def _average(self, server: StageServer, closed: ClosedStep) -> DigestVerdict | None:
        """Average the closed step's gradients in place with the stage's peers (``needs_sync`` when that happened
        alone), with what the step stated as it closed; returns the group's verdict on the members' weight digests
        (None: no vote)."""
        st, step = self.state, closed.step
        # offenders are left out of this node's span; confirmed ones are not even grouped with, while a suspect
        # only this node caught still is, so that its other peers can confirm it
        confirmed = self.checks.confirmed_offenders()
        others = self.ahead.expected(server, confirmed)
        if not others:
            return None
        st.last_digest = closed.digest
        result = await self.averager.step(
            closed.grads,
            weight=closed.weight,
            group_key=averaging_group_key(st.run_id, server.index, step),
            target_group_size=len(others) + 1,
            exclude=closed.offenders,
            avoid=confirmed,
            state_digest=closed.digest,
            state_age_steps=closed.age_steps,
            expected=others,  # the stage's peers agree on the group directly when their views agree
        )
        await self.checks.inspect(step, server.index, result.inspected)
        if not result.with_others:
            log.warning(
                "%s: step %d of stage %d averaged alone (peers: %d); will adopt a peer's next state",
                st.me.short(),
                step,
                server.index,
                len(others),
            )
            st.needs_sync = True
            return None
        return digest_majority(result.members)

    def _tied_peers(self, server: StageServer, offenders: frozenset[PeerID]) -> list[PeerID]:
        """The peers of the stage holding the other copy of the tied matrix (not in ``offenders``), shuffled."""
        if tied_index(server) is None:
            return []
        other = self.state.run_cfg.pipeline.num_stages - 1 if server.index == 0 else 0
        trusted = [p for p in self.state.view.stage_peers(other) if p not in offenders]
        return self.state.rng.sample(trusted, len(trusted))

    def report_claims(self, evidence: StepEvidence, own_step: int) -> None:
        """Report every peer whose step claim the records do not back, far ahead of this node (claim rule)."""
        if evidence.believed is None:
            return
        for peer, claimed in evidence.to_report(own_step).items():
            self.checks.report_step_claim(
                peer, claimed=claimed, believed=evidence.believed, step=own_step, stage=self.state.stage()
            )

    async def catch_up(self, server: StageServer) -> None:
        """Download the state of a peer of the stage that is ahead, or jump to the swarm's step when none is; only
        as far as the step-claim rule believes."""
        st = self.state
        evidence = st.step_evidence(self.checks.offenders())
        self.report_claims(evidence, server.step)
        offenders = self.checks.offenders()  # with the peers just reported
        swarm_step = st.swarm_step(offenders)
        sources = st.stage_sources(server.index, offenders)
        peer, newest = sources[0] if sources else (None, -1)
        now = time.monotonic()
        # strictly ahead: a server's weights change only together with its step, so that validators replaying
        # a step's work with the weights they downloaded for that step never see two versions of them
        ahead = peer is not None and newest >= server.step + 1
        if not ahead and swarm_step <= server.step + 1:
            st.behind_since = None
            return
        if st.behind_since is None:
            st.behind_since = now
        if not ahead and now - st.behind_since >= st.cfg.behind_grace_s:
            # the whole stage fell behind the drivers (e.g. its peers were lost): nobody to download from
            log.warning(
                "%s: stage %d is at step %d, the swarm at %d, and no peer of the stage is ahead; jumping",
                st.me.short(),
                server.index,
                server.step,
                swarm_step,
            )
            await asyncio.to_thread(server.skip_to, swarm_step)
            st.state_age_steps = 0
            st.behind_since = None
        elif peer is not None and ahead and (st.needs_sync or now - st.behind_since >= st.cfg.behind_grace_s):
            try:
                await asyncio.to_thread(server.close_step)
                await self.sync.sync_from(peer, server)
                st.needs_sync = False
            except (SwarmError, TimeoutError, OSError) as e:
                st.selectors[server.index].report_failure(peer)
                log.warning("%s: state download from %s failed: %s", st.me.short(), peer.short(), e)
                await asyncio.to_thread(server.skip_to, server.step)
            st.behind_since = None
            await self.records.publish_record()
