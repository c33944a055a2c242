"""Suite-wide fixtures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """A CLI run in-process (click's CliRunner) configures the root logger (`swarm.cli.logs.setup_logging`, e.g.
    at ``--log-level ERROR``); put its level back and drop the handlers it added, so that no test sees another's
    logging setup."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):  # pytest's own capture handlers come and go per phase: left to pytest
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
