"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def set_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--set FIELD=VALUE`` (repeatable, into the ``overrides`` parameter): override a field of the run config.

    The overrides go to `swarm.run.config.RunConfig.load`, which applies them to the parsed TOML, so they change
    the run id exactly as editing the file would.
    """
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="FIELD=VALUE",
        help="Override a run-config field, e.g. --set optimizer.lr=1e-3 (repeatable; VALUE is read as TOML, "
        "else as a string). Changes the run id exactly as editing the file would.",
    )(func)
