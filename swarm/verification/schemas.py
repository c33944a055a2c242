"""The record schemas of the verification layer's DHT keys, for a node to install (see `swarm.dht.schema`).

Each schema lives beside its message: receipts and verdicts are batches in parts (subkey
``[owner:<PeerID>]#<part>``), outlier reports, attestations and heartbeats one record per owner
(``[owner:<PeerID>]``); every value is the message's msgpack bytes.
"""

from __future__ import annotations

from swarm.dht.schema import RecordSchema
from swarm.verification.attestation import ATTESTATION_SCHEMA
from swarm.verification.election import ORCHESTRATOR_SCHEMA
from swarm.verification.outliers import OUTLIERS_SCHEMA
from swarm.verification.receipts import RECEIPTS_SCHEMA
from swarm.verification.verdicts import VERDICTS_SCHEMA

VERIFICATION_SCHEMAS: tuple[RecordSchema, ...] = (
    RECEIPTS_SCHEMA,
    VERDICTS_SCHEMA,
    OUTLIERS_SCHEMA,
    ATTESTATION_SCHEMA,
    ORCHESTRATOR_SCHEMA,
)
