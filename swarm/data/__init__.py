"""Training data: sources of token sequences and the per-driver shards drawn from them."""

from swarm.data.sources import DataSource, MarkovSource, Microbatch, ShardedData, TextSource, make_source

__all__ = ["DataSource", "MarkovSource", "Microbatch", "ShardedData", "TextSource", "make_source"]
