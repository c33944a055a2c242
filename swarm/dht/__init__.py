"""Kademlia on the `swarm.p2p` transport: routing, iterative lookup, owned records, storage, the DHT node.

``from swarm.dht import DHT, DHTConfig, ValueWithExpiration, owner_subkey`` is the public surface of Kademlia;
see docs/dht.md.
"""

from swarm.dht.config import DHTConfig
from swarm.dht.node import DHT
from swarm.dht.keys import owner_subkey
from swarm.dht.records import Record, RecordValidator, ValueWithExpiration, make_record, record_owner
from swarm.dht.routing import Contact

__all__ = [
    "DHT",
    "Contact",
    "DHTConfig",
    "Record",
    "RecordValidator",
    "ValueWithExpiration",
    "make_record",
    "owner_subkey",
    "record_owner",
]
