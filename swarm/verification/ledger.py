"""The orchestrator's ledger: one JSON line per attestation it signed, appended with fsync."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

from swarm.p2p.identity import PeerID
from swarm.errors import ProtocolError, VerificationError
from swarm.verification.attestation import Attestation

log = logging.getLogger(__name__)


def attestation_to_json(att: Attestation) -> dict[str, Any]:
    """A JSON-friendly view (PeerIDs in base58) plus ``wire``: the exact signed message, base64."""
    return {
        "run_id": att.run_id,
        "window": att.window,
        "term": att.term,
        "orchestrator": att.orchestrator_id.to_base58(),
        "shares": {PeerID(e.peer).to_base58(): e.share for e in att.shares},
        "work": {PeerID(e.peer).to_base58(): e.work for e in att.shares},
        "flagged": [PeerID(p).to_base58() for p in att.flagged],
        "evidence_hash": att.evidence_hash.hex(),
        "digest": att.digest.hex(),
        "prev_digest": att.prev_digest.hex(),
        "issued_at": att.issued_at,
        "wire": base64.b64encode(att.pack()).decode("ascii"),
    }


def attestation_from_json(obj: Any) -> Attestation:
    """The attestation of a ledger line (from its ``wire`` field); VerificationError if malformed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("wire"), str):
        raise VerificationError("ledger line has no 'wire' field; it was not written by swarm")
    try:
        return Attestation.unpack(base64.b64decode(obj["wire"], validate=True))
    except (ValueError, ProtocolError) as e:
        raise VerificationError(f"ledger line holds a malformed attestation: {e}") from None


class Ledger:
    """Append-only JSON-lines file of attestations (each line fsynced before `append` returns)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, att: Attestation) -> None:
        """Append one attestation and fsync the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(attestation_to_json(att), sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[Attestation]:
        """All attestations in file order; a truncated last line (a crash mid-write) is skipped with a warning."""
        if not self.path.exists():
            return []
        out = []
        lines = self.path.read_text("utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(attestation_from_json(json.loads(line)))
            except (json.JSONDecodeError, VerificationError) as e:
                if number == len(lines):
                    log.warning("ledger %s: skipping a truncated last line: %s", self.path, e)
                    continue
                raise VerificationError(f"ledger {self.path} line {number} is corrupt: {e}") from None
        return out
