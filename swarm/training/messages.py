"""Wire messages of the training swarm: ``stage.*`` and ``state.*`` RPCs, and the DHT records it publishes.

Tensors travel as `swarm.compression.serialize_tensor` bytes (self-describing, codec per role); the receiver
decodes them with size limits and then checks shape and dtype against its stage (`StageModel.input_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarm.dht.keys import CONFIG, PEERS
from swarm.dht.schema import RecordKind, RecordSchema
from swarm.p2p.messages import Message
from swarm.training.node_role import PEER_RECORD_ROLES, Role

MAX_RECORD_PERIOD_S = 60.0  # the longest `record_period_s` a node may use
MAX_PEER_RECORD_TTL_S = 4 * MAX_RECORD_PERIOD_S
REACHABILITY_VALUES = (
    "unknown",
    "public",
    "relayed",
    "private",
)  # swarm.p2p.reachability.Status  # peer, progress and config records: a few record periods at most


@dataclass(frozen=True, kw_only=True)
class ForwardRequest(Message):
    """``stage.forward``: run this stage on ``inputs`` for microbatch ``microbatch_id`` of ``step``."""

    run_id: str
    stage: int
    step: int
    microbatch_id: str
    inputs: bytes
    upstream: bytes = (
        b""  # swarm.verification.witness.UpstreamWork: the caller's own previous-stage work on these inputs
    )


@dataclass(frozen=True, kw_only=True)
class ForwardReply(Message):
    outputs: bytes
    ack: bytes = b""  # the server's signature of the work claim (swarm.verification.receipts.sign_ack), or empty
    weights: bytes = b""  # the digest of the weights that computed it, as the work claim names it (b"": not named)


@dataclass(frozen=True, kw_only=True)
class BackwardRequest(Message):
    """``stage.backward``: accumulate gradients; ``grad_outputs`` for inner stages, ``targets`` for the last."""

    run_id: str
    stage: int
    step: int
    microbatch_id: str
    inputs: bytes
    grad_outputs: bytes | None = None
    targets: bytes | None = None
    upstream: bytes = (
        b""  # swarm.verification.witness.UpstreamWork: the caller's own previous-stage work on these inputs
    )

    def __post_init__(self) -> None:
        if (self.grad_outputs is None) == (self.targets is None):
            raise ValueError("exactly one of grad_outputs (inner stage) and targets (last stage) must be given")


@dataclass(frozen=True, kw_only=True)
class BackwardReply(Message):
    grad_inputs: bytes | None = None
    loss: float | None = None
    ack: bytes = b""  # the server's signature of the work claim (swarm.verification.receipts.sign_ack), or empty
    weights: bytes = b""  # the digest of the weights that computed it, as the work claim names it (b"": not named)


@dataclass(frozen=True, kw_only=True)
class StateRequest(Message):
    """``state.download``: the stage's parameters and optimizer state, streamed in chunks."""

    run_id: str
    stage: int


@dataclass(frozen=True, kw_only=True)
class TensorInfo(Message):
    name: str
    shape: list[int]


@dataclass(frozen=True, kw_only=True)
class StateHeader(Message):
    """The reply header of ``state.download``: the step and the layout of the flat float32 vector that follows."""

    run_id: str
    stage: int
    step: int
    tensors: list[TensorInfo]


@dataclass(frozen=True, kw_only=True)
class PeerRecord(Message):
    """A node's entry under ``{run}/peers`` (subkey ``[owner:<PeerID>]``): what it serves and how fast."""

    role: Role
    stage: int | None
    maddrs: list[str]
    throughput: float
    step: int
    config_hash: str
    # how to reach it: "public" (maddrs were dialled back), "relayed" (maddrs are circuit addresses through
    # relays), "private" (behind NAT, no relay yet: only over the connections it keeps open), "unknown"
    reachability: str = "unknown"

    @property
    def relayed(self) -> bool:
        """Behind NAT: reachable only through relays (or over connections it keeps open)."""
        return self.reachability in ("relayed", "private")

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role.parse(self.role, allowed=PEER_RECORD_ROLES))  # ConfigError: ValueError
        if self.reachability not in REACHABILITY_VALUES:
            raise ValueError(f"reachability must be one of {REACHABILITY_VALUES}")
        if self.stage is not None and self.stage < 0:
            raise ValueError("stage must be >= 0")
        if self.throughput < 0 or self.step < 0:
            raise ValueError("throughput and step must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RunConfigRecord(Message):
    """A node's entry under ``runs/{name}/config`` (subkey ``[owner:<PeerID>]``, refreshed with its `PeerRecord`):
    its run config's hash and dictionary form, which the join check (`swarm.training.join_check`) reads."""

    hash: str
    config: dict[str, Any]


PEERS_SCHEMA = RecordSchema(
    key=PEERS, kind=RecordKind.OWNED, value_types=(PeerRecord,), max_ttl_s=MAX_PEER_RECORD_TTL_S
)
CONFIG_SCHEMA = RecordSchema(
    key=CONFIG, kind=RecordKind.OWNED, value_types=(RunConfigRecord,), max_ttl_s=MAX_PEER_RECORD_TTL_S
)
