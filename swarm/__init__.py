"""swarm: peer-to-peer training of one neural network across many machines.

This top-level module stays import-light: `swarm.errors` is the one module that every layer
(`compression/`, `dht/`, `verification/`) may import, so nothing heavy may be imported here.
"""

__version__ = "0.1.0"
