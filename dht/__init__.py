"""The DHT layer: identity, multiaddrs, typed messages, the transport, and Kademlia.

``from dht import DHT, DHTConfig, ValueWithExpiration, owner_subkey`` is the public surface of Kademlia;
see docs/dht.md.
"""

from dht.config import DHTConfig
from dht.node import DHT
from dht.records import Record, RecordValidator, ValueWithExpiration, make_record, owner_subkey, record_owner
from dht.routing import Contact

__all__ = [
    "DHT",
    "DHTConfig",
    "Contact",
    "Record",
    "RecordValidator",
    "ValueWithExpiration",
    "make_record",
    "owner_subkey",
    "record_owner",
]
