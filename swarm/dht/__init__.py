"""The DHT layer: identity, multiaddrs, typed messages, the transport, and Kademlia.

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
