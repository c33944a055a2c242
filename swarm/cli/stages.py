"""`swarm-dht stages`: the per-stage view of a run (peers, throughput, step; loss, samples/s) from the DHT alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from swarm.dht import DHT
from swarm.cli.dht_client import json_option, run_with_dht
from swarm.cli.options import set_option
from swarm.errors import ConfigError
from swarm.run.config import RunConfig
from swarm.dht.keys import peers_key, progress_key
from swarm.training.view import SwarmView, format_table


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=(
        "Run config TOML of the swarm (a file, or a shipped preset name; default: tiny_gpt); "
        "gives the run id and stages."
    ),
)
@set_option
@json_option
@click.pass_context
def stages(ctx: click.Context, config_path: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Per stage: the peers serving it, their summed throughput and newest step; overall loss and samples/s."""
    try:
        run = RunConfig.load(config_path, overrides)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)

    async def action(dht: DHT) -> dict[str, Any]:
        view = SwarmView.parse(
            await dht.get(peers_key(run.run_id), latest=True), await dht.get(progress_key(run.run_id), latest=True)
        )
        return {"run_id": run.run_id, **view.summary(run.pipeline.num_stages)}

    summary = run_with_dht(ctx, action)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"run {summary['run_id']}")
        click.echo(format_table(summary))
