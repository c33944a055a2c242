"""Link profiles of the WAN test bed: what one host's access link does to the frames that cross it.

A `Profile` describes the path between two hosts that both use it, as the issue states it (``wan``: 25 ms one
way, 100 Mbit/s). The bed realises a path as two access links, the sender's uplink and the receiver's downlink, so
`Profile.link` gives each host's link half the one-way delay and a loss per crossing of ``1 - sqrt(1 - loss)``:
a frame between two hosts of one profile then sees the profile's delay, rate and loss. A `LinkConfig` holds one
host's link as the emulator applies it (`Bed.set_link` changes it while the bed runs: a blip, a lossy host).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.configs import Config, setting


class LinkConfig(Config, section="link"):
    """One host's access link, each direction: delay, jitter, rate, random loss and a drop-tail queue."""

    delay_ms: float = setting(default=0.0, ge=0, le=10_000, doc="One-way delay of this link, each direction (ms).")
    jitter_ms: float = setting(
        default=0.0, ge=0, le=10_000, doc="Extra delay drawn uniformly in [0, jitter_ms] per frame; never reorders."
    )
    up_mbit: float = setting(default=1000.0, gt=0, le=100_000, doc="Uplink rate, host to switch (Mbit/s).")
    down_mbit: float = setting(default=1000.0, gt=0, le=100_000, doc="Downlink rate, switch to host (Mbit/s).")
    loss: float = setting(default=0.0, ge=0, le=1, doc="Chance that a frame is lost, per crossing of this link.")
    queue_bytes: int | None = setting(
        default=None, ge=0, le=1 << 30, doc="Drop-tail queue of each direction (None: one bandwidth-delay product)."
    )

    def queue_limit_bytes(self, rate_mbit: float, frame_bytes: int) -> int:
        """The queue of a direction at ``rate_mbit``: ``queue_bytes``, or the path's bandwidth-delay product (rate
        times a round trip of two such links), at least four frames of ``frame_bytes``."""
        if self.queue_bytes is not None:
            return self.queue_bytes
        rtt_s = 4 * self.delay_ms / 1000  # a round trip crosses two links of this delay each way
        return max(int(rate_mbit * 1e6 / 8 * rtt_s), 4 * frame_bytes)


@dataclass(frozen=True)
class Profile:
    """A path between two hosts of this profile: one-way delay, rates, loss (what the issue's profiles state)."""

    name: str
    one_way_ms: float
    up_mbit: float
    down_mbit: float
    loss: float = 0.0

    @property
    def rtt_ms(self) -> float:
        return 2 * self.one_way_ms

    @property
    def path_mbit(self) -> float:
        """The rate of a path between two hosts of this profile: the sender's uplink or the receiver's downlink."""
        return min(self.up_mbit, self.down_mbit)

    def link(self, **changes: float | None) -> LinkConfig:
        """Each host's access link: half the delay, and ``1 - sqrt(1 - loss)`` per crossing (two crossings a path)."""
        fields: dict[str, float | None] = {
            "delay_ms": self.one_way_ms / 2,
            "up_mbit": self.up_mbit,
            "down_mbit": self.down_mbit,
            "loss": 1 - math.sqrt(1 - self.loss),
        }
        fields.update(changes)
        return LinkConfig(**fields)  # type: ignore[arg-type]


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(name="lan", one_way_ms=0.5, up_mbit=1000, down_mbit=1000),
        Profile(name="wan", one_way_ms=25, up_mbit=100, down_mbit=100),
        Profile(name="home", one_way_ms=40, up_mbit=20, down_mbit=100, loss=0.001),
        Profile(name="far", one_way_ms=100, up_mbit=50, down_mbit=50),
    )
}


def profile(name: str) -> Profile:
    """The profile called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
