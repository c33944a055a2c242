"""The averager the training loop calls once per step: matchmaking (directly among the expected peers when they
agree, else through the DHT), then butterfly all-reduce, in place."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from swarm.p2p.identity import PeerID
from swarm.p2p import Transport
from swarm.averaging.allreduce import AllReduceOutcome, AllReduceServer, Group, InspectedPart, run_allreduce
from swarm.averaging.config import AveragerConfig
from swarm.averaging.direct import DirectMatchmaker
from swarm.averaging.matchmaking import GroupStore, Matchmaker
from swarm.averaging.messages import MemberInfo
from swarm.averaging.partition import flat_view_or_copy, unflatten_into
from swarm.averaging.stats import AveragingStats
from swarm.averaging.wire import CompressionPartCodec, PartCodec
from swarm.errors import SwarmError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AveragingResult:
    """The outcome of one :meth:`Averager.step`.

    ``with_others``: the tensors now hold an average with at least one other peer. ``group_size``: members of
    the agreed group (1 when alone). ``lost_peers``: members whose span or parts were lost in the exchange
    (their share fell back to local values or was left out of the mean).
    """

    with_others: bool
    group_size: int
    group: tuple[PeerID, ...] = ()
    lost_peers: tuple[PeerID, ...] = ()
    round_id: bytes = b""
    inspected: tuple[InspectedPart, ...] = ()  # with ``inspect_parts``: the members' values of parts we reduced
    excluded: tuple[PeerID, ...] = ()  # members left out by ``exclude`` (neither lost nor averaged with)
    members: tuple[MemberInfo, ...] = ()  # the agreed membership with each member's state digest (empty: alone)


class Averager:
    """Averages a stage's tensors with the peers that are ready under the same group key."""

    def __init__(
        self,
        config: AveragerConfig,
        *,
        transport: Transport,
        dht: GroupStore,
        codec: PartCodec | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.transport = transport
        self.codec = codec if codec is not None else CompressionPartCodec(config.codec)
        self.server = AllReduceServer(config, transport, self.codec)
        self.matchmaker = Matchmaker(config, transport, dht, self.server, clock=clock)
        self.stats = AveragingStats()  # what the rounds came to (read by the metrics endpoint)
        self.direct = DirectMatchmaker(config, transport, self.server)
        self.server.register()
        self.matchmaker.register()
        self.direct.register()

    def unregister(self) -> None:
        """Stop serving the averaging RPCs this averager registered (the transport is shared and stays up), and
        cancel the withdrawals still in flight."""
        self.direct.unregister()
        self.matchmaker.unregister()
        self.server.unregister()

    async def step(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float,
        group_key: str,
        timeout_s: float | None = None,
        target_group_size: int | None = None,
        exclude: Collection[PeerID] = (),
        avoid: Collection[PeerID] = (),
        state_digest: bytes = b"",
        state_age_steps: int = 0,
        expected: Collection[PeerID] = (),
    ) -> AveragingResult:
        """Average ``tensors`` in place with the group under ``group_key``, weighted by ``weight`` (samples).

        ``target_group_size`` overrides the config's for this call (e.g. the stage's current number of peers, so
        the group closes as soon as all of them are visible). ``exclude``: peers whose parts this peer refuses
        in the span it reduces (its gradient checks found them cheating); they do not count as lost.
        ``avoid``: peers matchmaking neither counts, recruits nor follows (confirmed cheaters).
        ``state_digest`` / ``state_age_steps``: this peer's digest of the weights it averages for and their age,
        stated to the group (`swarm.averaging.digests`); the result's ``members`` carry every member's.
        ``expected``: the peers this one expects in the group (e.g. the stage's peers in the run's records): they
        first try to agree directly (`swarm.averaging.direct`, within ``matchmaking_time_s``), and fall back to
        matchmaking through the DHT when their expectations differ.

        Never raises on peer faults: when no group forms the tensors keep their own values and ``with_others`` is
        False; when the round breaks part-way, each part holds the group's average or keeps its own values
        (``lost_peers`` names who failed). Bounded by ``timeout_s`` (default: every phase's deadline added up).
        """
        _check_step_args(tensors, weight, target_group_size)
        cfg = self.config
        direct_s = cfg.matchmaking_time_s if expected else 0.0
        total_s = timeout_s or (
            direct_s + cfg.matchmaking_time_s + cfg.join_timeout_s + 2 * cfg.rpc_timeout_s + cfg.allreduce_timeout_s
        )
        me = self.transport.peer_id.short()
        flat = await asyncio.to_thread(flat_view_or_copy, tensors)
        try:
            async with asyncio.timeout(total_s):
                group = await self._form(
                    group_key,
                    float(weight),
                    target_group_size=target_group_size,
                    avoid=avoid,
                    expected=expected,
                    state_digest=state_digest,
                    state_age_steps=state_age_steps,
                )
                self.matchmaker.withdraw_soon(group_key)  # for later peers: not on our critical path
                if len(group.members) == 1:
                    return self._alone(group.round_id, failed=False)
                outcome = await self._reduce(group, group_key, flat, float(weight), exclude)
        except TimeoutError:
            log.warning(
                "%s: averaging under %r passed its %.1fs deadline; parts not averaged keep local values",
                me,
                group_key,
                total_s,
            )
            return self._alone()
        except (SwarmError, OSError) as e:
            log.warning("%s: averaging under %r failed (%s); parts not averaged keep local values", me, group_key, e)
            return self._alone()
        await asyncio.to_thread(unflatten_into, flat, tensors)
        result = _result(group, outcome)
        self.stats.record(
            group_size=result.group_size, with_others=result.with_others, lost_peers=len(result.lost_peers)
        )
        return result

    def announce_ahead(
        self,
        group_key: str,
        *,
        expected: Collection[PeerID],
        state_digest: bytes = b"",
        state_age_steps: int = 0,
    ) -> None:
        """Tell ``expected`` this peer's entry under ``group_key`` before it is ready (`swarm.averaging.direct`): a
        later `step` with the same key, expectation and digest forms the group without an announcement on its
        critical path. Calling it again with the same arguments renews the same entry."""
        if not expected:
            return
        me = self.direct.ahead_entry(group_key, expected, state_digest, state_age_steps)
        if me is None:
            me = self.matchmaker.my_info(1.0, state_digest=state_digest, state_age_steps=state_age_steps)
        self.direct.announce_ahead(group_key, me, expected)

    async def _form(
        self,
        group_key: str,
        weight: float,
        *,
        target_group_size: int | None,
        avoid: Collection[PeerID],
        expected: Collection[PeerID],
        state_digest: bytes,
        state_age_steps: int,
    ) -> Group:
        """The group: directly among ``expected`` when they agree, else through the DHT."""
        if expected:
            # the entry announced ahead, if any: the expected peers may have ranked it already
            me = self.direct.ahead_entry(group_key, expected, state_digest, state_age_steps) or self.matchmaker.my_info(
                weight, state_digest=state_digest, state_age_steps=state_age_steps
            )
            group = await self.direct.form_group(
                group_key, me, expected, timeout_s=self.config.matchmaking_time_s, avoid=avoid
            )
            if isinstance(group, Group):
                return group
            # the expected peers that did not show up in time are not waited for twice
            target_group_size = min(group, target_group_size or self.config.target_group_size)
        return await self.matchmaker.form_group(
            group_key,
            weight,
            target_group_size=target_group_size,
            exclude=avoid,
            withdraw=False,
            state_digest=state_digest,
            state_age_steps=state_age_steps,
        )

    def _alone(self, round_id: bytes = b"", *, failed: bool = True) -> AveragingResult:
        """The result of a step that averaged with nobody: the tensors keep their own values (``failed``: because
        the round passed its deadline or broke, rather than finding no peer)."""
        self.stats.record(group_size=1, with_others=False, failed=failed)
        return AveragingResult(with_others=False, group_size=1, group=(self.transport.peer_id,), round_id=round_id)

    async def _reduce(
        self, group: Group, group_key: str, flat: torch.Tensor, weight: float, exclude: Collection[PeerID]
    ) -> AllReduceOutcome:
        log.info(
            "%s: averaging %d values with %d peers under %r (round %s)",
            self.transport.peer_id.short(),
            flat.numel(),
            len(group.members),
            group_key,
            group.round_id.hex()[:8],
        )
        return await run_allreduce(self.server, group, flat, weight, exclude=exclude)


def _check_step_args(tensors: Sequence[torch.Tensor], weight: float, target_group_size: int | None) -> None:
    """SwarmError unless ``step``'s arguments are usable (they come from this node, not from peers)."""
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise SwarmError(f"weight must be a finite number of samples > 0, got {weight!r}")
    if not tensors:
        raise SwarmError("step() needs at least one tensor to average")
    if target_group_size is not None and (
        not isinstance(target_group_size, int) or isinstance(target_group_size, bool) or target_group_size < 1
    ):
        raise SwarmError(f"target_group_size must be None or an int >= 1, got {target_group_size!r}")


def _result(group: Group, outcome: AllReduceOutcome) -> AveragingResult:
    """A finished round's result: who took part, who was lost, what the reducer inspected."""
    members = tuple(group.peer(i) for i in range(len(group.members)))
    lost = tuple(dict.fromkeys(outcome.lost_owners + outcome.dropped_senders))
    others = len(members) - 1 - len(outcome.excluded)
    return AveragingResult(
        with_others=len(lost) < others,
        group_size=len(members),
        group=members,
        lost_peers=lost,
        round_id=group.round_id,
        inspected=outcome.inspected,
        excluded=outcome.excluded,
        members=group.members,
    )
