"""Training data: sources of token sequences, tokenizers, token shards, and the per-driver draws from them."""

from swarm.data.binding import bind_data, manifest_path
from swarm.data.manifest import Manifest, load_manifest, verify_manifest
from swarm.data.shard_source import ShardSource
from swarm.data.sources import DataSource, MarkovSource, Microbatch, ShardedData, TextSource, make_source

__all__ = [
    "DataSource",
    "Manifest",
    "MarkovSource",
    "Microbatch",
    "ShardSource",
    "ShardedData",
    "TextSource",
    "bind_data",
    "load_manifest",
    "make_source",
    "manifest_path",
    "verify_manifest",
]
