"""A whole swarm on one machine (`swarm-node local`) and gathering a swarm's stages into one checkpoint."""
