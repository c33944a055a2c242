"""`Role`: what a node does in the run (``swarm-node start --role``), the value its `PeerRecord` carries.

A `StrEnum`, so the wire (msgpack), the summary JSON and the command line keep the plain strings ``auto``,
``server``, ``trainer``, ``validator`` and ``dht``; `Role.parse` turns any other text into a `ConfigError`.
"""

from __future__ import annotations

import enum

from swarm.errors import ConfigError


class Role(enum.StrEnum):
    """A node's role. ``auto`` serves a stage (and drives on stage 0), ``server`` serves only, ``trainer`` drives
    only, ``validator`` checks others' work, ``dht`` runs the DHT alone."""

    AUTO = "auto"
    SERVER = "server"
    TRAINER = "trainer"
    VALIDATOR = "validator"
    DHT = "dht"

    @classmethod
    def parse(cls, value: object, *, allowed: frozenset[Role] | None = None) -> Role:
        """The role named by ``value`` (a `Role` or its string); ConfigError if unknown or not in ``allowed``."""
        choices = allowed if allowed is not None else frozenset(cls)
        names = ", ".join(r.value for r in cls if r in choices)
        if not isinstance(value, str) or value not in cls.__members__.values():
            raise ConfigError(f"unknown role {value!r}; use one of {names}")
        role = cls(value)
        if role not in choices:
            raise ConfigError(f"role {role.value!r} is not allowed here; use one of {names}")
        return role

    @property
    def trains(self) -> bool:
        """Whether a node of this role runs the training role (`TrainingRole`)."""
        return self in TRAINING_ROLES


TRAINING_ROLES = frozenset({Role.AUTO, Role.SERVER, Role.TRAINER})
"""The roles of a `TrainingConfig`."""

PEER_RECORD_ROLES = frozenset({Role.AUTO, Role.SERVER, Role.TRAINER, Role.VALIDATOR})
"""The roles a node publishes in its ``{run}/peers`` record (a ``dht`` node publishes none)."""
