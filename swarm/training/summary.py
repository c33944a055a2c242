"""`NodeSummary`: what a node reports when it stops (``swarm-node start --summary-file``), written and read here only.

A trainer and a validator each build one `NodeSummary` when they stop; `swarm-node local` reads every node's file
and aggregates them into the run's summary. The file is one JSON object whose keys are the field names below (the
keys of the hand-written dicts this replaces, so older files still read); fields a role does not fill keep their
defaults. `NodeSummary.write` is atomic (a temporary file, then a rename), so a reader never sees half a file;
`NodeSummary.read` checks every field and raises `SummaryError` for a missing, unreadable or malformed file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.errors import ProtocolError, SwarmError
from swarm.p2p.messages import Message
from swarm.p2p.traffic import TrafficSnapshot
from swarm.training.node_role import PEER_RECORD_ROLES, Role

MAX_SUMMARY_SIZE_BYTES = 64 * 1024 * 1024


class SummaryError(SwarmError):
    """A node summary file is missing, unreadable or not a valid summary; the message names the file."""

    code = "summary"


@dataclass(frozen=True, kw_only=True)
class VerificationSummary(Message):
    """A training node's verification duties (`swarm.training.verifying.NodeVerification.summary`)."""

    misbehave: str | None = None  # the cheat this node ran on purpose (--misbehave), or None
    orchestrator_candidate: bool = False
    attested_windows: list[int] = field(default_factory=list)  # the windows it attested as orchestrator
    ledger_path: str | None = None  # its orchestrator ledger (candidates only)


@dataclass(frozen=True, kw_only=True)
class TrafficSummary(Message):
    """The wire bytes a node's transport counted per RPC method family (`swarm.p2p.traffic`), from the role's start
    to the run's last step (or the stop), over ``steps`` steps; ``*_per_step`` divide by ``max(steps, 1)``."""

    steps: int  # the steps the count spans (the step reached minus the step the role started at)
    sent_bytes: dict[str, int] = field(default_factory=dict)  # family -> bytes sent
    received_bytes: dict[str, int] = field(default_factory=dict)  # family -> bytes received
    sent_bytes_per_step: dict[str, float] = field(default_factory=dict)
    received_bytes_per_step: dict[str, float] = field(default_factory=dict)
    method_sent_bytes_per_step: dict[str, float] = field(default_factory=dict)  # full method name -> bytes
    method_received_bytes_per_step: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        counts: list[dict[str, int] | dict[str, float]] = [self.sent_bytes, self.received_bytes]
        counts += [self.sent_bytes_per_step, self.received_bytes_per_step]
        counts += [self.method_sent_bytes_per_step, self.method_received_bytes_per_step]
        if any(value < 0 for each in counts for value in each.values()):
            raise ValueError("byte counts must be >= 0")

    @classmethod
    def of(cls, counted: TrafficSnapshot, steps: int) -> TrafficSummary:
        """The summary of the bytes ``counted`` over ``steps`` steps."""
        per = max(steps, 1)

        def per_step(counts: dict[str, int]) -> dict[str, float]:
            return {k: round(v / per, 1) for k, v in sorted(counts.items())}

        return cls(
            steps=max(steps, 0),
            sent_bytes=dict(sorted(counted.sent_bytes.items())),
            received_bytes=dict(sorted(counted.received_bytes.items())),
            sent_bytes_per_step=per_step(counted.sent_bytes),
            received_bytes_per_step=per_step(counted.received_bytes),
            method_sent_bytes_per_step=per_step(counted.sent_by_method),
            method_received_bytes_per_step=per_step(counted.received_by_method),
        )


@dataclass(frozen=True, kw_only=True)
class NodeSummary(Message):
    """One node's losses, counts and checks when it stopped. Times: ``*_time`` wall clock (s), ``elapsed_s``
    since the role started."""

    peer_id: str
    role: Role  # a string is parsed
    run_id: str
    step: int  # the step the node had reached
    elapsed_s: float
    # training nodes
    stage: int | None = None  # the stage served at the end (None: a trainer or a validator)
    losses: dict[int, list[float]] = field(default_factory=dict)  # step -> losses of the microbatches it drove
    samples: int = 0  # samples it drove
    served_samples: int = 0  # samples its stage served
    first_sample_time: float | None = None
    end_time: float | None = None  # when it reached max_steps (or stopped)
    step_times: dict[int, float] = field(default_factory=dict)  # step -> when its stage finished it (wall clock)
    loss_floor: float | None = None  # the data's loss floor, when known
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss (the evaluator only)
    verification: VerificationSummary | None = None
    device: str | None = None  # the torch device its stage computed on (``--device auto`` resolved)
    precision: str | None = None  # the run's compute precision (fp32, bf16)
    peak_rss_bytes: int | None = None  # the node process's peak resident memory (None where the OS does not say)
    traffic: TrafficSummary | None = None  # wire bytes per RPC family, in all and per step
    # validators
    checks: int = 0  # receipts checked
    failed: int = 0  # checks that failed
    windows_checked: int = 0
    states_synced: int = 0
    attested_windows: list[int] = field(default_factory=list)
    ledger_path: str | None = None  # the validator's orchestrator ledger

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role.parse(self.role, allowed=PEER_RECORD_ROLES))
        if not self.peer_id or not self.run_id:
            raise ValueError("peer_id and run_id must not be empty")
        for name in ("step", "samples", "served_samples", "checks", "failed", "windows_checked", "states_synced"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"stage must be None or >= 0, got {self.stage}")

    @property
    def misbehaving(self) -> bool:
        """Whether this node cheated on purpose (``--misbehave``)."""
        return self.verification is not None and self.verification.misbehave is not None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the file (step keys of ``losses``, ``eval_losses``, ``step_times`` as strings)."""
        obj = self.to_wire()
        obj["losses"] = {str(step): list(losses) for step, losses in sorted(self.losses.items())}
        obj["eval_losses"] = {str(step): loss for step, loss in sorted(self.eval_losses.items())}
        obj["step_times"] = {str(step): t for step, t in sorted(self.step_times.items())}
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> NodeSummary:
        """Check a decoded JSON object; ProtocolError if it is not a summary."""
        for name in ("losses", "eval_losses", "step_times"):
            if isinstance(obj, dict) and isinstance(obj.get(name), dict):
                try:
                    obj = {**obj, name: {int(step): value for step, value in obj[name].items()}}
                except ValueError:
                    raise ProtocolError(
                        f"NodeSummary.{name}: keys must be step numbers, got {list(obj[name])}"
                    ) from None
        return cls.from_wire(obj)

    def write(self, path: Path) -> None:
        """Write the summary to ``path`` atomically: ``.<name>.tmp`` in the same folder, then a rename."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> NodeSummary:
        """The summary in ``path``; SummaryError if it is missing, unreadable or malformed."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SUMMARY_SIZE_BYTES + 1)
        except FileNotFoundError:
            raise SummaryError(f"no node summary at {path} (the node did not stop cleanly?)") from None
        except OSError as e:
            raise SummaryError(f"cannot read the node summary {path}: {e}") from None
        if len(data) > MAX_SUMMARY_SIZE_BYTES:
            raise SummaryError(f"the node summary {path} is over {MAX_SUMMARY_SIZE_BYTES} bytes")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise SummaryError(f"the node summary {path} is not valid JSON: {e}") from None
        try:
            return cls.from_json(obj)
        except ProtocolError as e:
            raise SummaryError(f"the node summary {path} is malformed: {e}") from None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes (``getrusage``), or None where there is no ``resource``
    module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux
