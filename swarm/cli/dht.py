"""`swarm-dht`: inspect a swarm's DHT from a client-mode node.

    swarm-dht --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW... peers [--run RUN] [--json]
    swarm-dht get KEY [--latest] [--json]
    swarm-dht put KEY VALUE --ttl SECONDS [--subkey S] [--owned --identity FILE] [--json]
    swarm-dht routing-table [--json]

``--initial-peers`` may come from ``SWARM_INITIAL_PEERS``. Commands of other areas are plain ``click.command``s
built on :mod:`swarm.cli.dht_client` (:func:`json_option`, :func:`run_with_dht`, :func:`emit`), which never
imports this module; they are added to the group here with ``main.add_command(cmd)``: `stages`
(swarm/cli/stages.py) and `attestations` (swarm/cli/attestations.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from swarm.dht import DHT
from swarm.dht.keys import owner_subkey, peers_key
from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.maddr import parse_maddr
from swarm.dht.records import ValueWithExpiration
from swarm.cli.attestations import attestations
from swarm.cli.dht_client import ClientOptions, emit, json_option, run_with_dht, split_maddrs
from swarm.cli.logs import LOG_LEVELS, setup_logging
from swarm.cli.stages import stages
from swarm.errors import SwarmError
from swarm.training.messages import PEERS_SCHEMA, PeerRecord

__all__ = ["ClientOptions", "emit", "json_option", "main", "run_with_dht"]


@click.group()
@click.option(
    "--initial-peers",
    "initial_peers",
    multiple=True,
    envvar="SWARM_INITIAL_PEERS",
    help="Multiaddrs of swarm nodes to join through (repeatable or comma-separated); default: $SWARM_INITIAL_PEERS.",
)
@click.option(
    "--rpc-timeout", "rpc_timeout_s", type=float, default=3.0, show_default=True, help="Seconds to wait for one answer."
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="WARNING", show_default=True)
@click.pass_context
def main(ctx: click.Context, initial_peers: tuple[str, ...], rpc_timeout_s: float, log_level: str) -> None:
    """Inspect a swarm's DHT (joins as a client-mode node, which nobody routes to)."""
    setup_logging(log_level)
    ctx.obj = ClientOptions(initial_peers=split_maddrs(initial_peers), rpc_timeout_s=rpc_timeout_s)


@main.command()
@click.option("--run", "run_id", default=None, help="Run id: read role and stage from the {run}/peers records.")
@json_option
@click.pass_context
def peers(ctx: click.Context, run_id: str | None, as_json: bool) -> None:
    """Every reachable peer, found by crawling routing tables, with multiaddrs, role and stage."""

    async def action(dht: DHT) -> list[dict[str, Any]]:
        replies = await dht.crawl()
        meta: dict[PeerID, PeerRecord] = {}
        if run_id is not None:
            for entry in PEERS_SCHEMA.entries(await dht.get(peers_key(run_id), latest=True)):
                if entry.owner is not None and isinstance(entry.value, PeerRecord):
                    meta[entry.owner] = entry.value
        rows = []
        for reply in replies:
            peer = PeerID(reply.peer.peer_id)
            record = meta.get(peer)
            rows.append(
                {
                    "peer_id": str(peer),
                    "maddrs": list(reply.peer.maddrs),
                    "role": record.role if record else None,
                    "stage": record.stage if record else None,
                    "num_records": reply.num_records,
                }
            )
        return sorted(rows, key=lambda r: r["peer_id"])

    emit(run_with_dht(ctx, action), ("peer_id", "role", "stage", "num_records", "maddrs"), as_json)


def _value_rows(found: ValueWithExpiration | dict[Any, ValueWithExpiration] | None) -> list[dict[str, Any]]:
    now = time.time()
    if found is None:
        return []
    items = found.items() if isinstance(found, dict) else [(None, found)]
    return [
        {
            "subkey": k,
            "value": v.value,
            "expiration_time": v.expiration_time,
            "expires_in_s": round(v.expiration_time - now, 1),
        }
        for k, v in items
    ]


@main.command()
@click.argument("key")
@click.option("--latest", is_flag=True, help="Ask the k closest peers and keep the newest version.")
@json_option
@click.pass_context
def get(ctx: click.Context, key: str, latest: bool, as_json: bool) -> None:
    """Print the value of KEY (one row per subkey for a dictionary value); exit 1 if not found."""
    rows = _value_rows(run_with_dht(ctx, lambda dht: dht.get(key, latest=latest)))
    emit(rows, ("subkey", "value", "expires_in_s"), as_json)
    if not rows:
        sys.exit(1)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@main.command()
@click.argument("key")
@click.argument("value")
@click.option(
    "--ttl",
    "ttl_s",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    help="Seconds until the record expires.",
)
@click.option("--subkey", default=None, help="Store under this subkey of a dictionary value.")
@click.option("--owned", is_flag=True, help="Owned record: subkey [owner:<PeerID of --identity>], signed.")
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="PEM Ed25519 key that signs owned records (and identifies this client).",
)
@json_option
@click.pass_context
def put(
    ctx: click.Context,
    key: str,
    value: str,
    ttl_s: float,
    subkey: str | None,
    owned: bool,
    identity_path: Path | None,
    as_json: bool,
) -> None:
    """Store VALUE (JSON if it parses, else a string) under KEY for --ttl seconds."""
    identity = None
    if identity_path is not None:
        try:
            identity = Identity.load(identity_path)
        except SwarmError as e:
            raise click.BadParameter(str(e), param_hint="--identity") from None
    if owned:
        if identity is None:
            raise click.UsageError("--owned needs --identity FILE: the key that signs the record")
        subkey = (
            subkey
            if subkey is not None and owner_subkey(identity.peer_id) in subkey
            else owner_subkey(identity.peer_id)
        )
    expiration = time.time() + ttl_s
    stored = run_with_dht(
        ctx, lambda dht: dht.store(key, _parse_value(value), expiration, subkey=subkey), identity=identity
    )
    emit(
        [{"key": key, "subkey": subkey, "stored": stored, "expiration_time": expiration}],
        ("key", "subkey", "stored", "expiration_time"),
        as_json,
    )
    if not stored:
        sys.exit(1)


@main.command("routing-table")
@json_option
@click.pass_context
def routing_table(ctx: click.Context, as_json: bool) -> None:
    """The routing table of the first initial peer that answers: one row per contact."""

    async def action(dht: DHT) -> list[dict[str, Any]]:
        errors = []
        for maddr in ctx.obj.initial_peers:
            try:
                peer_id = await dht.transport.connect(parse_maddr(maddr))
                reply = await dht.protocol.call_routing_table(peer_id)
            except (SwarmError, OSError, TimeoutError) as e:
                errors.append(f"{maddr}: {e}")
                continue
            return [
                {"bucket": b, "peer_id": str(PeerID(info.peer_id)), "maddrs": list(info.maddrs)}
                for b, info in sorted(zip(reply.buckets, reply.peers, strict=False), key=lambda x: -x[0])
            ]
        raise SwarmError("no initial peer answered: " + "; ".join(errors))

    emit(run_with_dht(ctx, action), ("bucket", "peer_id", "maddrs"), as_json)


main.add_command(attestations)
main.add_command(stages)

if __name__ == "__main__":
    main()
