"""Orchestrator election: signed heartbeats in the DHT and a deterministic, verifiable leader rule.

Candidates (validators and nodes started with ``--orchestrator-candidate``) store a signed heartbeat under
``{run}/orchestrator`` (their owner subkey) every ``heartbeat_interval_s``; it expires after
``heartbeat_ttl_s``. The leader for a window is the live candidate with the smallest
``leader_rank(run, PeerID)`` (a SHA-256), the same on every machine. The term of window ``w`` is the term of
window ``w - 1`` plus one when the orchestrator changed (1 for the first window), so every attestation
carries a term a verifier can check against the chain.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from swarm.p2p.identity import SIGNATURE_SIZE_BYTES, Identity, PeerID
from swarm.p2p.messages import Message
from swarm.configs import Config, setting
from swarm.errors import ConfigError, RecordError
from swarm.verification.attestation import leader_rank
from swarm.dht.keys import ORCHESTRATOR, orchestrator_key, owner_subkey
from swarm.dht.schema import RecordKind, RecordSchema
from swarm.verification.common import MAX_HEARTBEAT_TTL_S, RecordStore, peer_from_bytes, record_items, signing_body

log = logging.getLogger(__name__)

_HEARTBEAT_DOMAIN = b"swarm/heartbeat/v1\x00"


class ElectionRole(enum.StrEnum):
    """Who stands in an election: a validator, or a training node started with ``--orchestrator-candidate``."""

    VALIDATOR = "validator"
    CANDIDATE = "candidate"

    @classmethod
    def parse(cls, value: object) -> ElectionRole:
        """The role named by ``value``; ConfigError (a ValueError) if it is none."""
        if not isinstance(value, str) or value not in cls.__members__.values():
            raise ConfigError(f"role must be one of {[r.value for r in cls]}, got {value!r}")
        return cls(value)


class ElectionConfig(Config, section="election"):
    """Heartbeat period and expiry, in seconds."""

    heartbeat_interval_s: float = setting(default=1.0, gt=0, le=3600, doc="Seconds between a candidate's heartbeats.")
    heartbeat_ttl_s: float = setting(
        default=5.0, le=86400, doc="Lifetime of a heartbeat; longer than heartbeat_interval_s."
    )

    def validate(self) -> None:
        if not self.heartbeat_interval_s < self.heartbeat_ttl_s:
            raise self.invalid(
                "heartbeat_ttl_s",
                f"must exceed heartbeat_interval_s ({self.heartbeat_interval_s}) and be <= 86400, "
                f"got {self.heartbeat_ttl_s!r}",
            )


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    run_id: str
    candidate: bytes
    role: ElectionRole
    issued_at: float
    expires_at: float
    signature: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", ElectionRole.parse(self.role))
        if not self.expires_at > self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if len(self.signature) != SIGNATURE_SIZE_BYTES:
            raise ValueError(f"signature must have {SIGNATURE_SIZE_BYTES} bytes")
        peer_from_bytes(self.candidate, "candidate")

    def body(self) -> bytes:
        fields = self.to_wire()
        del fields["signature"]
        return signing_body(_HEARTBEAT_DOMAIN, fields)

    @property
    def candidate_id(self) -> PeerID:
        return PeerID(self.candidate)

    def is_live(self, now: float) -> bool:
        """Signed by the candidate and not expired at ``now``."""
        return (
            self.issued_at <= now + 60.0
            and now < self.expires_at
            and self.candidate_id.verify(self.signature, self.body())
        )


ORCHESTRATOR_SCHEMA = RecordSchema(
    key=ORCHESTRATOR, kind=RecordKind.OWNED, value_types=(Heartbeat,), packed=True, max_ttl_s=MAX_HEARTBEAT_TTL_S
)


def sign_heartbeat(
    identity: Identity, *, run_id: str, role: ElectionRole, now: float, cfg: ElectionConfig
) -> Heartbeat:
    unsigned = Heartbeat(
        run_id=run_id,
        candidate=identity.peer_id.to_bytes(),
        role=role,
        issued_at=now,
        expires_at=now + cfg.heartbeat_ttl_s,
        signature=bytes(SIGNATURE_SIZE_BYTES),
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.body()))


async def publish_heartbeat(store: RecordStore, hb: Heartbeat) -> bool:
    return await store.store(
        orchestrator_key(hb.run_id), hb.pack(), hb.expires_at, subkey=owner_subkey(hb.candidate_id)
    )


async def fetch_heartbeats(store: RecordStore, run_id: str) -> list[Heartbeat]:
    """Well-formed heartbeats of this run stored under their candidates' own subkeys."""
    out = []
    for subkey, raw in record_items(await store.get(orchestrator_key(run_id), latest=True)):
        try:
            hb = ORCHESTRATOR_SCHEMA.parse_value(raw)
            if not isinstance(hb, Heartbeat):
                raise RecordError(f"expected a Heartbeat, got a {type(hb).__name__}")
        except RecordError as e:
            log.warning("dropping a malformed heartbeat for %s: %s", run_id, e)
            continue
        if hb.run_id == run_id and subkey == owner_subkey(hb.candidate_id):
            out.append(hb)
    return out


def live_candidates(heartbeats: Iterable[Heartbeat], run_id: str, now: float) -> list[PeerID]:
    """The candidates with a live heartbeat, best-ranked first."""
    live = {hb.candidate_id for hb in heartbeats if hb.run_id == run_id and hb.is_live(now)}
    return sorted(live, key=lambda p: leader_rank(run_id, p))


def choose_leader(heartbeats: Iterable[Heartbeat], run_id: str, now: float) -> PeerID | None:
    """The leader at ``now``: the best-ranked live candidate, or None if there is none."""
    ranked = live_candidates(heartbeats, run_id, now)
    return ranked[0] if ranked else None
