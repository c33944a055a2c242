"""Bytes through the transport, counted per RPC method family, in both directions (`Traffic`).

A method's family is the part of its name before the first dot (``stage.forward`` → ``stage``; ``avg``,
``dht``, ``state``, ``verify``, …). Frames of no stream (keep-alives, connection errors) and the Noise handshake
count as ``p2p``; a late frame of a stream already finished counts as ``other``.

Every count is of wire bytes: the encrypted records, with their length prefixes and tags. On the sending side
that is what the socket was handed; on the receiving side each record's bytes are counted with the frame that
completes in it (a sender never puts two frames in one record, so the attribution is exact).

The frames of a stream are also counted under its full method name (``by_method``), so a reader can tell apart
methods of one family (``stage.forward`` and ``stage.backward``, the activations, from ``stage.tied``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

P2P_FAMILY = "p2p"
OTHER_FAMILY = "other"


def method_family(method: str) -> str:
    """The family of an RPC method name: its first dotted part (``"stage.forward"`` → ``"stage"``)."""
    family = method.split(".", 1)[0]
    return family if family and family != "?" else OTHER_FAMILY


@dataclass(frozen=True)
class TrafficSnapshot:
    """Bytes sent and received per family, at one moment."""

    sent_bytes: dict[str, int] = field(default_factory=dict)
    received_bytes: dict[str, int] = field(default_factory=dict)
    sent_by_method: dict[str, int] = field(default_factory=dict)  # stream frames only, by full method name
    received_by_method: dict[str, int] = field(default_factory=dict)

    def minus(self, earlier: TrafficSnapshot) -> TrafficSnapshot:
        """The bytes counted since ``earlier`` (families and methods with none left out)."""

        def diff(now: dict[str, int], then: dict[str, int]) -> dict[str, int]:
            return {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0) > 0}

        return TrafficSnapshot(
            diff(self.sent_bytes, earlier.sent_bytes),
            diff(self.received_bytes, earlier.received_bytes),
            diff(self.sent_by_method, earlier.sent_by_method),
            diff(self.received_by_method, earlier.received_by_method),
        )

    @property
    def total_sent_bytes(self) -> int:
        return sum(self.sent_bytes.values())

    @property
    def total_received_bytes(self) -> int:
        return sum(self.received_bytes.values())

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {
            "sent_bytes": dict(sorted(self.sent_bytes.items())),
            "received_bytes": dict(sorted(self.received_bytes.items())),
            "sent_by_method": dict(sorted(self.sent_by_method.items())),
            "received_by_method": dict(sorted(self.received_by_method.items())),
        }


class Traffic:
    """The byte counters of one transport (all its connections add to them): one count per stream method, plus
    ``p2p`` and ``other`` for frames of no stream; the families are summed from them when a snapshot is taken."""

    def __init__(self) -> None:
        self._sent: defaultdict[str, int] = defaultdict(int)
        self._received: defaultdict[str, int] = defaultdict(int)

    def sent(self, key: str, size_bytes: int) -> None:
        """Count ``size_bytes`` sent under ``key``: a stream's method name, or `P2P_FAMILY` / `OTHER_FAMILY`."""
        self._sent[key] += size_bytes

    def received(self, key: str, size_bytes: int) -> None:
        """Count ``size_bytes`` received under ``key`` (as `sent`)."""
        self._received[key] += size_bytes

    def snapshot(self) -> TrafficSnapshot:
        return TrafficSnapshot(
            _by_family(self._sent), _by_family(self._received), _by_method(self._sent), _by_method(self._received)
        )


def _by_family(counts: dict[str, int]) -> dict[str, int]:
    families: defaultdict[str, int] = defaultdict(int)
    for key, size in list(counts.items()):
        families[method_family(key)] += size
    return dict(families)


def _by_method(counts: dict[str, int]) -> dict[str, int]:
    return {key: size for key, size in list(counts.items()) if key not in (P2P_FAMILY, OTHER_FAMILY)}
