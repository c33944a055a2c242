"""Command-line entry points: `swarm-node` (node.py) and `swarm-dht` (dht.py).

The CLIs only parse options into configs and call one entry point; this package is the only place
that configures logging (see `swarm.cli.logs.setup_logging`).
"""
