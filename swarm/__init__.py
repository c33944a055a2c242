"""swarm: peer-to-peer training of one neural network across many machines.

It is the one top-level package of the wheel; its parts are layered packages below it (`swarm.p2p`,
`swarm.compression`, `swarm.dht`, ... `swarm.cli`: docs/architecture.md, enforced by tests/test_layers.py).
This module imports nothing, so importing any part loads only that part and the layers below it.
"""

__version__ = "0.1.0"
