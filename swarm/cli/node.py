"""`swarm-node`: run a swarm node. Parses options into a NodeConfig and calls Node.run.

    swarm-node start --listen /ip4/0.0.0.0/tcp/31337 --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW... \
        [--data-dir DIR] [--identity FILE] [--http 127.0.0.1:8080]

Prints ``listening on <multiaddr with /p2p/PeerID>`` as soon as it listens (for people); programs pass
``--events-file PATH`` and read the node's events there (`swarm.local.events`). SIGINT/SIGTERM stop it cleanly
(exit code 0).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import click

from swarm.p2p import TransportConfig
from swarm.p2p.reachability import ReachabilityConfig
from swarm.cli.logs import LOG_LEVELS, setup_logging
from swarm.cli.training import export, local, training_config, training_options
from swarm.errors import SwarmError
from swarm.local.events import EventWriter, HttpEvent, ListeningEvent, ReachabilityEvent, ServingEvent, StoppedEvent
from swarm.node import Node, NodeConfig
from swarm.observe import HttpConfig, Observer, parse_http_address
from swarm.testing.misbehave import MisbehaveConfig
from swarm.training.trainer import TrainingConfig
from swarm.training.validator import ValidatorConfig


def _split_maddrs(values: tuple[str, ...]) -> tuple[str, ...]:
    """Accept repeated options, comma- or space-separated lists."""
    return tuple(part for value in values for part in value.replace(",", " ").split() if part)


class _Reporter:
    """What the node tells its starter: lines on stdout for people, and the events in ``--events-file``."""

    def __init__(self, events_file: Path | None) -> None:
        self.events = EventWriter(events_file) if events_file is not None else None

    def listening(self, maddrs: tuple[str, ...]) -> None:
        for maddr in maddrs:
            print(f"listening on {maddr}", flush=True)
        if self.events is not None:
            self.events.emit(ListeningEvent(maddrs=list(maddrs)))

    def http(self, observer: Observer) -> None:
        print(f"http: {observer.describe()}", flush=True)
        if self.events is not None:
            self.events.emit(HttpEvent(url=observer.url))

    def serving(self, stage: int | None) -> None:
        print(f"serving stage {stage if stage is not None else 'none (trainer)'}", flush=True)
        if self.events is not None:
            self.events.emit(ServingEvent(stage=stage))

    def reachability(self, status: str, maddrs: tuple[str, ...]) -> None:
        print(f"reachability {status}: announcing {', '.join(maddrs) or 'no address'}", flush=True)
        if self.events is not None:
            self.events.emit(ReachabilityEvent(status=status, maddrs=list(maddrs)))

    def stopped(self, error: str | None) -> None:
        if self.events is not None:
            self.events.emit(StoppedEvent(error=error))


async def _run_until_signal(config: NodeConfig, reporter: _Reporter) -> None:
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_event.set)
    try:
        await Node(config).run(
            stop_event,
            on_listening=reporter.listening,
            on_serving=reporter.serving,
            on_reachability=reporter.reachability,
            on_http=reporter.http,
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _http_config(address: str | None) -> HttpConfig | None:
    """``--http HOST:PORT`` as an HttpConfig (None: off); ConfigError if malformed."""
    if address is None:
        return None
    host, port = parse_http_address(address)
    return HttpConfig(host=host, port=port)


def _role(cfg: TrainingConfig | ValidatorConfig | None) -> dict[str, Any]:
    """The NodeConfig field a role config goes to."""
    return {"validator": cfg} if isinstance(cfg, ValidatorConfig) else {"training": cfg}


@click.group()
def main() -> None:
    """Run a node of the swarm."""


@main.command()
@click.option(
    "--listen",
    "listen",
    multiple=True,
    default=("/ip4/127.0.0.1/tcp/0",),
    show_default=True,
    help="Multiaddr to listen on (repeatable). Use /ip4/0.0.0.0/tcp/PORT to accept other machines.",
)
@click.option(
    "--initial-peers",
    "initial_peers",
    multiple=True,
    help="Multiaddrs (with /p2p/<PeerID>) of peers to join through; repeatable or comma-separated.",
)
@click.argument("more_initial_peers", nargs=-1, metavar="[MADDR]...")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path.home() / ".swarm",
    show_default=True,
    help="Directory for the node's state (its identity key is identity.pem there).",
)
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM Ed25519 key file to use instead of <data-dir>/identity.pem (must exist).",
)
@click.option(
    "--rpc-timeout",
    "rpc_timeout_s",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for an answer to one request.",
)
@click.option(
    "--announce",
    "announce",
    multiple=True,
    help="Multiaddr port forwarding makes reachable, e.g. /ip4/203.0.113.5/tcp/31337 (repeatable; announced once "
    "peers dial it back). Behind a home router without one, leave it out: the node uses relays by itself.",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO", show_default=True)
@click.option(
    "--events-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append the node's events here, one JSON object per line: listening, http, serving, stopped (for programs).",
)
@click.option(
    "--http",
    "http_address",
    metavar="HOST:PORT",
    default=None,
    help="Serve /metrics (Prometheus), /health and a status page here; off by default. Binds loopback unless a "
    "HOST is given (0.0.0.0: every interface); port 0 picks a free one.",
)
@training_options
def start(
    listen: tuple[str, ...],
    initial_peers: tuple[str, ...],
    more_initial_peers: tuple[str, ...],
    data_dir: Path,
    identity_path: Path | None,
    rpc_timeout_s: float,
    announce: tuple[str, ...],
    log_level: str,
    events_file: Path | None,
    http_address: str | None,
    **training: Any,
) -> None:
    """Start a node: listen, join through the initial peers, serve until SIGINT/SIGTERM."""
    setup_logging(log_level)
    misbehave: str | None = training.pop("misbehave")
    try:
        reporter = _Reporter(events_file)
    except OSError as e:
        click.echo(f"error: cannot write --events-file {events_file}: {e}", err=True)
        sys.exit(1)
    error: str | None = None
    try:
        config = NodeConfig(
            transport=TransportConfig(listen_maddrs=_split_maddrs(listen), rpc_timeout_s=rpc_timeout_s),
            initial_peers=_split_maddrs(initial_peers + more_initial_peers),
            reachability=ReachabilityConfig(announce=_split_maddrs(announce)),
            data_dir=data_dir.expanduser(),
            identity_path=identity_path.expanduser() if identity_path is not None else None,
            **_role(training_config(data_dir=data_dir.expanduser(), rpc_timeout_s=rpc_timeout_s, **training)),
            misbehave=MisbehaveConfig(kind=misbehave) if misbehave is not None else None,
            http=_http_config(http_address),
        )
        asyncio.run(_run_until_signal(config, reporter))
    except SwarmError as e:
        error = str(e)
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # a SIGINT before the signal handlers were installed: still a clean stop
        sys.exit(0)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        reporter.stopped(error)


main.add_command(local)
main.add_command(export)

if __name__ == "__main__":
    main()
