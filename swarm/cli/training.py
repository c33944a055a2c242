"""The training options of `swarm-node start`, and the `swarm-node local` and `swarm-node export` commands.

They only parse options into configs (`TrainingConfig`, `LaunchConfig`, `ExportConfig`) and call one entry point.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from swarm.cli.logs import LOG_LEVELS, setup_logging
from swarm.cli.options import set_option
from swarm.data import bind_data
from swarm.run.config import RunConfig
from swarm.errors import SwarmError
from swarm.model.devices import DEVICE_CHOICES
from swarm.testing.misbehave import KINDS as MISBEHAVE_KINDS
from swarm.testing.misbehave import parse_misbehave_spec
from swarm.training.node_role import Role
from swarm.training.training_config import TrainingConfig, parse_stage
from swarm.training.validator import ValidatorConfig
from swarm.training.verifying import ledger_path_for, node_verification_config


def training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--config --set --stage --role --device --max-steps --summary-file ...`` of `swarm-node start`."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Run config TOML (a file, or a shipped preset name; default: tiny_gpt).",
        ),
        set_option,
        click.option("--stage", default="auto", show_default=True, help="Stage to serve, or 'auto' (the weakest)."),
        click.option(
            "--role",
            type=click.Choice([role.value for role in Role]),
            default=Role.AUTO.value,
            show_default=True,
            help="auto: serve a stage (and drive on stage 0); server: serve only; trainer: "
            "drive only; validator: check others' work (no training); dht: no training.",
        ),
        click.option(
            "--device",
            type=click.Choice(DEVICE_CHOICES),
            default="cpu",
            show_default=True,
            help="Torch device of the stage; auto: CUDA if there, else MPS, else CPU.",
        ),
        click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps."),
        click.option(
            "--summary-file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Write the node's losses and counts here as JSON when it stops.",
        ),
        click.option(
            "--start-after-peers",
            type=int,
            default=0,
            show_default=True,
            help="Drive no microbatch until this many peers are in the run's records.",
        ),
        click.option(
            "--orchestrator-candidate",
            is_flag=True,
            help="Stand for election as the orchestrator that attests rewards (validators always do).",
        ),
        click.option(
            "--misbehave",
            type=click.Choice(MISBEHAVE_KINDS),
            default=None,
            help="Cheat on purpose (tests and demos): validators should flag this node.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def training_config(
    *,
    config_path: Path | None,
    overrides: tuple[str, ...] = (),
    stage: str,
    role: str | Role,
    device: str,
    max_steps: int | None,
    summary_file: Path | None,
    start_after_peers: int,
    data_dir: Path,
    rpc_timeout_s: float,
    orchestrator_candidate: bool = False,
) -> TrainingConfig | ValidatorConfig | None:
    """The node's TrainingConfig (or ValidatorConfig for ``--role validator``) from the parsed options
    (None for ``--role dht``). ``--misbehave`` is not a training option: `swarm.cli.node` hands it to the node."""
    role = Role.parse(role)
    if role == Role.DHT:
        return None
    run = bind_data(RunConfig.load(config_path, overrides))  # data files checked (and hashed) before listening
    if role == Role.VALIDATOR:
        return ValidatorConfig(
            run=run,
            ledger_path=ledger_path_for(data_dir, run.run_id),
            summary_path=summary_file,
            max_steps=max_steps,
            rpc_timeout_s=rpc_timeout_s,
        )
    verification = node_verification_config(
        orchestrator_candidate=orchestrator_candidate, data_dir=data_dir, run_id=run.run_id
    )
    return TrainingConfig(
        run=run,
        stage=parse_stage(stage),
        role=role,
        device=device,
        max_steps=max_steps,
        summary_path=summary_file,
        start_after_peers=start_after_peers,
        checkpoint_dir=data_dir / "checkpoints" / run.run_id,
        rpc_timeout_s=rpc_timeout_s,
        verification=verification,
    )


@click.command()
@click.option("--nodes", "num_nodes", type=int, default=4, show_default=True, help="Node processes to start.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Run config TOML (a file, or a shipped preset name; default: tiny_gpt).",
)
@set_option
@click.option("--steps", type=int, default=30, show_default=True, help="Optimizer steps to train.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where node logs, checkpoints and summaries go (default: runs/<timestamp>).",
)
@click.option(
    "--timeout", "timeout_s", type=float, default=1800.0, show_default=True, help="Give up after this many seconds."
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="WARNING",
    show_default=True,
    help="The launcher's own log level.",
)
@click.option(
    "--validators",
    "num_validators",
    type=int,
    default=0,
    show_default=True,
    help="Validator processes to start besides the training nodes (they check work and attest rewards).",
)
@click.option(
    "--misbehave",
    "misbehave",
    multiple=True,
    metavar="KIND:COUNT",
    help="COUNT training nodes cheat with KIND (repeatable), e.g. lazy:1.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICE_CHOICES),
    default="auto",
    show_default=True,
    help="Every node's torch device; auto: CUDA if there, else MPS, else CPU.",
)
@click.option(
    "--http",
    "http_address",
    metavar="HOST:PORT",
    default="127.0.0.1:0",
    show_default=True,
    help="Node 0 serves the status page, /metrics and /health here (port 0: any free one; its URL is printed); "
    "'off': none.",
)
def local(
    num_nodes: int,
    config_path: Path | None,
    overrides: tuple[str, ...],
    steps: int,
    as_json: bool,
    run_dir: Path | None,
    timeout_s: float,
    log_level: str,
    num_validators: int,
    misbehave: tuple[str, ...],
    device: str,
    http_address: str,
) -> None:
    """Train with N node processes on this machine; live view on stderr; stops every process on exit or Ctrl-C."""
    from swarm.local.launcher import LaunchConfig, launch

    setup_logging(log_level)
    try:
        cfg = LaunchConfig(
            num_nodes=num_nodes,
            config_path=config_path,
            overrides=overrides,
            steps=steps,
            as_json=as_json,
            run_dir=run_dir,
            timeout_s=timeout_s,
            num_validators=num_validators,
            misbehave=tuple(parse_misbehave_spec(m) for m in misbehave),
            device=device,
            http=None if http_address == "off" else http_address,
        )
        code = launch(cfg)
    except SwarmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(code)


@click.command()
@click.option(
    "--initial-peers",
    "initial_peers",
    multiple=True,
    envvar="SWARM_INITIAL_PEERS",
    help="Multiaddrs of swarm nodes (repeatable or comma-separated); or give --from-dir.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Run config TOML of the swarm (a file, or a shipped preset name; default: tiny_gpt).",
)
@set_option
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write: the single-process checkpoint (safetensors), or a folder (--format hf).",
)
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["safetensors", "hf"]),
    default="safetensors",
    show_default=True,
    help="safetensors: PipelineModel names in one file; hf: config.json + model.safetensors for transformers.",
)
@click.option(
    "--from-dir",
    "from_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Export offline from this run directory's stage checkpoints (swarm-node local's --run-dir).",
)
@click.option("--rpc-timeout", "rpc_timeout_s", type=float, default=10.0, show_default=True)
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="WARNING", show_default=True)
def export(
    initial_peers: tuple[str, ...],
    config_path: Path | None,
    overrides: tuple[str, ...],
    out_path: Path,
    export_format: str,
    from_dir: Path | None,
    rpc_timeout_s: float,
    log_level: str,
) -> None:
    """Gather every stage (from the swarm, or a run directory) into one checkpoint that loads into the
    single-process model, or into a Hugging Face folder that transformers loads."""
    from swarm.local.export import ExportConfig, export_model

    setup_logging(log_level)
    try:
        peers = tuple(p for v in initial_peers for p in v.replace(",", " ").split() if p)
        cfg = ExportConfig(
            run=bind_data(RunConfig.load(config_path, overrides)),
            initial_peers=peers,
            out_path=out_path,
            rpc_timeout_s=rpc_timeout_s,
            format=export_format,
            from_dir=from_dir,
        )
        steps = export_model(cfg)
    except SwarmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"wrote {out_path} (stage steps: {steps})")
