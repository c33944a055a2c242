"""What every `swarm-dht` command shares: the group's options, ``--json``, joining as a client, printing rows.

The commands (swarm/cli/dht.py, swarm/cli/stages.py, swarm/cli/attestations.py) import these from here and
swarm/cli/dht.py adds them all to its group, so no command module imports the group back (which also keeps
``python -m swarm.cli.dht`` working: that loads dht.py a second time, as ``__main__``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click

from swarm.dht import DHT, DHTConfig
from swarm.p2p.identity import Identity
from swarm.configs import Config, setting
from swarm.errors import SwarmError
from swarm.training.schemas import with_run_schemas

T = TypeVar("T")


class ClientOptions(Config, section="dht_client"):
    """The group's options, shared by every command."""

    initial_peers: tuple[str, ...] = setting(doc="Multiaddrs of peers to join through.")
    rpc_timeout_s: float = setting(doc="Deadline of one request.")


def split_maddrs(values: Sequence[str]) -> tuple[str, ...]:
    """Multiaddrs from repeated and/or comma- or space-separated option values."""
    return tuple(part for value in values for part in value.replace(",", " ").split() if part)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--json`` flag every command takes."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(func)


def run_with_dht(ctx: click.Context, action: Callable[[DHT], Awaitable[T]], *, identity: Identity | None = None) -> T:
    """Join as a client-mode node through the group's initial peers, run ``action(dht)``, leave; errors exit 1."""
    opts: ClientOptions = ctx.obj
    if not opts.initial_peers:
        raise click.UsageError("give --initial-peers (or set SWARM_INITIAL_PEERS) to reach a swarm")

    async def main() -> T:
        config = with_run_schemas(  # what it reads (and stores) is checked like every node checks it
            DHTConfig(
                initial_peers=opts.initial_peers,
                client_mode=True,
                rpc_timeout_s=opts.rpc_timeout_s,
                lookup_timeout_s=max(8.0, 2 * opts.rpc_timeout_s),
                maintenance_interval_s=3600.0,
            )
        )
        async with DHT.create(config, identity=identity) as dht:
            return await action(dht)

    try:
        return asyncio.run(main())
    except SwarmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def emit(rows: list[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """Print ``rows`` as a JSON list, or as an aligned table of ``columns``."""
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=False)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, (dict,)):
        return json.dumps(value, default=str)
    return str(value)
