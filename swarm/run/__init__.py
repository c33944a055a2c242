"""What one run trains: the run config (its canonical hash is the run id) and the shipped run presets.

``swarm/run/presets/*.toml`` are package data, read with `importlib.resources`; ``--config NAME`` picks one.
"""
