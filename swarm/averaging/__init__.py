"""Decentralized averaging of one stage's tensors: DHT matchmaking and butterfly all-reduce (docs/averaging.md)."""

from swarm.averaging.averager import Averager, AveragingResult
from swarm.averaging.config import AveragerConfig

__all__ = ["Averager", "AveragerConfig", "AveragingResult"]
