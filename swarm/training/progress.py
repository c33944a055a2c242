"""Step progress: what each driver has fed in the current step, and when the step's batch is complete.

Each driver publishes a `ProgressRecord` under ``{run}/progress`` (subkey ``[owner:<PeerID>]``). A step is
complete when the samples of records at that step reach ``target_batch_size``. Records come from the DHT, so
they are parsed with `ProgressRecord.from_wire`; a malformed one is skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from swarm.dht.keys import PROGRESS
from swarm.dht.schema import RecordKind, RecordSchema
from swarm.errors import ProtocolError
from swarm.p2p.messages import Message
from swarm.training.messages import MAX_PEER_RECORD_TTL_S

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProgressRecord(Message):
    """One driver's progress: the step it feeds, the samples it completed in it, its rate, its latest loss (and,
    from the evaluating driver, its latest validation loss: see `swarm.training.evaluating`)."""

    step: int
    samples: int
    samples_per_s: float
    loss: float | None = None
    time: float = 0.0
    eval_step: int | None = None  # the evaluating driver's latest validation loss: the step of its weights
    eval_loss: float | None = None

    def __post_init__(self) -> None:
        if self.step < 0 or self.samples < 0 or self.samples_per_s < 0:
            raise ValueError("step, samples and samples_per_s must be >= 0")
        if (self.eval_step is None) != (self.eval_loss is None) or (self.eval_step or 0) < 0:
            raise ValueError("eval_step and eval_loss come together, eval_step >= 0")


PROGRESS_SCHEMA = RecordSchema(
    key=PROGRESS, kind=RecordKind.OWNED, value_types=(ProgressRecord,), max_ttl_s=MAX_PEER_RECORD_TTL_S
)


def parse_records(items: Iterable[tuple[Any, Any]]) -> dict[str, ProgressRecord]:
    """(subkey, value) pairs from the DHT -> records by subkey; malformed values are skipped."""
    out: dict[str, ProgressRecord] = {}
    for subkey, value in items:
        try:
            out[str(subkey)] = ProgressRecord.from_wire(value)
        except ProtocolError as e:
            log.warning("skipping a malformed progress record from %s: %s", subkey, e)
    return out


def step_samples(records: Iterable[ProgressRecord], step: int) -> int:
    """Samples completed in ``step`` over all drivers."""
    return sum(r.samples for r in records if r.step == step)


@dataclass(frozen=True, kw_only=True)
class StepHint(Message):
    """``step.hint``: a driver's `ProgressRecord` told straight to a training peer of the run (``progress``), which
    the receiver takes as the caller's record (the connection authenticates the caller, as the DHT's owner subkey
    does); without one, "the samples of ``step`` look complete": the receiver re-reads the records now.
    """

    run_id: str
    step: int
    progress: ProgressRecord | None = None


@dataclass(frozen=True, kw_only=True)
class StepHintReply(Message):
    pass
