"""Deliberate misbehaviour for tests and demos, plugged into the product through one small interface."""
