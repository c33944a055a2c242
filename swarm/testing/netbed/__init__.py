"""The WAN test bed: emulated internet hosts (network namespaces, TAP devices, a user-space link emulator) on one
Linux machine, for tests and benchmarks that must pay real round trips and line rates. See docs/netbed.md."""

from swarm.testing.netbed.bed import Bed, BedConfig
from swarm.testing.netbed.namespaces import NetbedError, missing_requirements
from swarm.testing.netbed.profiles import PROFILES, LinkConfig, Profile, profile

__all__ = ["PROFILES", "Bed", "BedConfig", "LinkConfig", "NetbedError", "Profile", "missing_requirements", "profile"]
