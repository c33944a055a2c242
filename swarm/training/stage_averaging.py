"""One all-reduce of a stage's tensors with the stage's peers, as both ways of closing a step run it: every step's
gradients (`swarm.training.stepping`) and local_sgd's outer-sync pseudo-gradients (`swarm.training.outer_sync`).

Offenders are left out of this node's span; confirmed ones are not even grouped with, while a suspect only this
node caught still is, so that its other peers can confirm it. The members state the digest of the weights the
tensors came from; the result is the group's verdict on those digests (`digest_majority`), or None when there was
no vote: no peer to average with, or the round ended alone (the state then ``needs_sync``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import torch

from swarm.averaging import Averager
from swarm.averaging.digests import DigestVerdict, digest_majority
from swarm.dht.keys import averaging_group_key
from swarm.p2p.identity import PeerID
from swarm.training.stage_server import StageServer
from swarm.training.state import TrainerState
from swarm.training.verifying import NodeVerification

log = logging.getLogger(__name__)


async def average_with_stage(
    st: TrainerState,
    averager: Averager,
    checks: NodeVerification,
    server: StageServer,
    step: int,
    tensors: list[torch.Tensor],
    *,
    weight: float,
    offenders: frozenset[PeerID],
    digest: Callable[[], Awaitable[bytes]],
    what: str,
    direct: bool,
) -> DigestVerdict | None:
    """Average ``tensors`` in place with the stage's peers (module docstring); ``digest`` gives the digest of the
    weights they came from (asked only when there is a peer), ``what`` names the round in the log, ``direct``
    lets the peers agree on the group directly when their views agree."""
    confirmed = checks.confirmed_offenders()
    others = [p for p in st.view.stage_peers(server.index) if p != st.me and p not in confirmed]
    if not others:
        return None
    st.last_digest = await digest()
    result = await averager.step(
        tensors,
        weight=max(weight, 1e-3),
        group_key=averaging_group_key(st.run_id, server.index, step),
        target_group_size=len(others) + 1,
        exclude=offenders,
        avoid=confirmed,
        state_digest=st.last_digest,
        state_age_steps=st.state_age_steps,
        expected=others if direct else (),
    )
    await checks.inspect(step, server.index, result.inspected)
    if not result.with_others:
        log.warning(
            "%s: %s %d of stage %d averaged alone (peers: %d); will adopt a peer's next state",
            st.me.short(),
            what,
            step,
            server.index,
            len(others),
        )
        st.needs_sync = True
        return None
    return digest_majority(result.members)
