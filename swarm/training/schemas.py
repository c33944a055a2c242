"""Every record schema of a run, for the DHT of a node or a client that reads a run (see `swarm.dht.schema`).

The training layer's own keys (``{run}/peers``, ``{run}/progress``, ``runs/{name}/config``), the averaging group
key and the verification keys: :func:`with_run_schemas` installs them all in a `DHTConfig`, so the node refuses
a STORE that breaks one and drops such records when it reads them from a peer.
"""

from __future__ import annotations

import dataclasses

from swarm.averaging.messages import GROUP_SCHEMA
from swarm.dht.config import DHTConfig
from swarm.dht.schema import RecordSchema, SchemaValidator
from swarm.training.messages import CONFIG_SCHEMA, PEERS_SCHEMA
from swarm.training.progress import PROGRESS_SCHEMA
from swarm.verification.schemas import VERIFICATION_SCHEMAS

TRAINING_SCHEMAS: tuple[RecordSchema, ...] = (PEERS_SCHEMA, PROGRESS_SCHEMA, CONFIG_SCHEMA)


def run_schemas() -> tuple[RecordSchema, ...]:
    """The schemas of every key a run writes."""
    return (*TRAINING_SCHEMAS, GROUP_SCHEMA, *VERIFICATION_SCHEMAS)


def with_run_schemas(config: DHTConfig) -> DHTConfig:
    """``config`` with a `SchemaValidator` of :func:`run_schemas` added (on the config's clock and clock skew)."""
    validator = SchemaValidator(run_schemas(), clock=config.clock, clock_skew_s=config.clock_skew_s)
    return dataclasses.replace(config, validators=(*config.validators, validator))
