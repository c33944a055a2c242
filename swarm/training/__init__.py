"""Training: the stage server, driver, wiring, tied exchange, steps, balancing, run records and checkpoints,
and the trainer and validator roles built on them."""
