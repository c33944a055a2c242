"""Every DHT key of a run, and the ``[owner:<PeerID>]`` subkeys, built and parsed in this one module.

Each key a run uses has a builder here and a :class:`KeyPattern` that recognises it (the schemas of
`swarm.dht.schema` match keys with these patterns). The strings are part of the wire protocol: change one and
nodes of different versions no longer find each other's records.

=====================================  =================================  ======================================
key                                    builder                            written by
=====================================  =================================  ======================================
``{run}/peers``                        :func:`peers_key`                  every node of the run (training)
``{run}/progress``                     :func:`progress_key`               every driver (training)
``runs/{name}/config``                 :func:`config_key`                 every node of the run (training)
``{run}/avg/{stage}/{step}``           :func:`averaging_group_key`        averaging members (averaging)
``{run}/receipts/{window}``            :func:`receipts_key`               callers (verification)
``{run}/verdicts/{window}``            :func:`verdicts_key`               validators (verification)
``{run}/outliers/{window}``            :func:`outliers_key`               all-reduce part owners (verification)
``{run}/attestation/{window}``         :func:`attestation_key`            the orchestrator (verification)
``{run}/orchestrator``                 :func:`orchestrator_key`           orchestrator candidates (verification)
=====================================  =================================  ======================================

This module sits in the DHT layer, the lowest layer that knows of owned subkeys and the highest one that
averaging and verification may import; it imports only `swarm.p2p.identity` below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from swarm.errors import IdentityError
from swarm.p2p.identity import PeerID

B58_CHARS = "1-9A-HJ-NP-Za-km-z"
OWNER_PREFIX = "[owner:"
OWNER_MARKER = re.compile(rf"\[owner:([{B58_CHARS}]+)\]")  # anywhere in a key or subkey: the record is owned
OWNER_MARKER_BYTES = re.compile(rf"\[owner:([{B58_CHARS}]+)\]".encode())
OWNER_SUBKEY = re.compile(rf"\[owner:(?P<owner>[{B58_CHARS}]+)\]")  # a whole subkey: ``[owner:<PeerID>]``
OWNER_PART_SUBKEY = re.compile(rf"\[owner:(?P<owner>[{B58_CHARS}]+)\]#(?P<part>0|[1-9][0-9]{{0,5}})")

_RUN = r"[^/]+"
_INT = r"(?:0|[1-9][0-9]{0,17})"


@dataclass(frozen=True)
class KeyPattern:
    """A family of keys (``name``) and the regular expression a whole key of it matches."""

    name: str
    regex: re.Pattern[str]

    def matches(self, key: Any) -> bool:
        return isinstance(key, str) and self.regex.fullmatch(key) is not None


PEERS = KeyPattern("peers", re.compile(rf"{_RUN}/peers"))
PROGRESS = KeyPattern("progress", re.compile(rf"{_RUN}/progress"))
CONFIG = KeyPattern("config", re.compile(rf"runs/{_RUN}/config"))
AVERAGING_GROUP = KeyPattern("averaging_group", re.compile(rf"{_RUN}/avg/{_INT}/{_INT}"))
RECEIPTS = KeyPattern("receipts", re.compile(rf"{_RUN}/receipts/{_INT}"))
VERDICTS = KeyPattern("verdicts", re.compile(rf"{_RUN}/verdicts/{_INT}"))
OUTLIERS = KeyPattern("outliers", re.compile(rf"{_RUN}/outliers/{_INT}"))
ATTESTATION = KeyPattern("attestation", re.compile(rf"{_RUN}/attestation/{_INT}"))
ORCHESTRATOR = KeyPattern("orchestrator", re.compile(rf"{_RUN}/orchestrator"))
ALL_PATTERNS = (PEERS, PROGRESS, CONFIG, AVERAGING_GROUP, RECEIPTS, VERDICTS, OUTLIERS, ATTESTATION, ORCHESTRATOR)


# ---- keys -------------------------------------------------------------------------------------------------------


def peers_key(run_id: str) -> str:
    """Each node's `PeerRecord` (role, stage, addresses, step), one owned subkey per node."""
    return f"{run_id}/peers"


def progress_key(run_id: str) -> str:
    """Each driver's `ProgressRecord` (the step it feeds and its samples), one owned subkey per driver."""
    return f"{run_id}/progress"


def config_key(run_name: str) -> str:
    """Not hashed: a node with a different config of the same run name finds it and learns which field differs."""
    return f"runs/{run_name}/config"


def averaging_group_key(run_id: str, stage: int, step: int) -> str:
    """Where the replicas of ``stage`` meet to average the gradients of ``step``."""
    return f"{run_id}/avg/{stage}/{step}"


def receipts_key(run_id: str, window: int) -> str:
    return f"{run_id}/receipts/{window}"


def verdicts_key(run_id: str, window: int) -> str:
    return f"{run_id}/verdicts/{window}"


def outliers_key(run_id: str, window: int) -> str:
    return f"{run_id}/outliers/{window}"


def attestation_key(run_id: str, window: int) -> str:
    return f"{run_id}/attestation/{window}"


def orchestrator_key(run_id: str) -> str:
    return f"{run_id}/orchestrator"


# ---- owned subkeys ----------------------------------------------------------------------------------------------


def owner_subkey(peer_id: PeerID) -> str:
    """The marker that makes a key or subkey owned by ``peer_id``: ``[owner:<PeerID base58>]``."""
    return f"{OWNER_PREFIX}{peer_id.to_base58()}]"


def part_subkey(peer_id: PeerID, part: int) -> str:
    """Part ``part`` of a batch ``peer_id`` publishes in several records: ``[owner:<PeerID>]#<part>``."""
    return f"{owner_subkey(peer_id)}#{part}"


def _peer(text: str) -> PeerID | None:
    try:
        return PeerID.from_base58(text)
    except IdentityError:
        return None


def subkey_owner(subkey: Any) -> PeerID | None:
    """The PeerID of a subkey that is exactly ``[owner:<PeerID>]``; None for anything else."""
    match = OWNER_SUBKEY.fullmatch(subkey) if isinstance(subkey, str) else None
    return None if match is None else _peer(match["owner"])


def part_subkey_owner(subkey: Any) -> tuple[PeerID, int] | None:
    """The PeerID and part number of a subkey that is exactly ``[owner:<PeerID>]#<part>``; None otherwise."""
    match = OWNER_PART_SUBKEY.fullmatch(subkey) if isinstance(subkey, str) else None
    if match is None:
        return None
    peer = _peer(match["owner"])
    return None if peer is None else (peer, int(match["part"]))


def is_owner_subkey(subkey: Any) -> bool:
    """Whether ``subkey`` is an ``[owner:<PeerID>]`` marker naming a valid PeerID."""
    return subkey_owner(subkey) is not None
