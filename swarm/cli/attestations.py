"""`swarm-dht attestations`: fetch a run's reward attestations and verify them.

    swarm-dht --initial-peers ... attestations --run RUN [--window W] [--verify] [--json]

With ``--verify`` every accepted attestation is checked: its signature, that shares sum to 1, its place in
the chain (previous digest, term) and that its shares and flags follow from the receipts, verdicts and
outlier reports stored in the DHT. Exits 1 if any window fails (or none is found).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from swarm.cli.dht_client import emit, json_option, run_with_dht
from swarm.verification.audit import audit_run


@click.command("attestations")
@click.option("--run", "run_id", required=True, help="Run id (the run config's hash).")
@click.option("--window", type=click.IntRange(min=0), default=None, help="Only this window (default: all, from 0).")
@click.option("--verify", is_flag=True, help="Recompute each attestation from the DHT's receipts and verdicts.")
@json_option
@click.pass_context
def attestations(ctx: click.Context, run_id: str, window: int | None, verify: bool, as_json: bool) -> None:
    """List (and with --verify, check) the run's accepted attestation of each window."""
    audits = run_with_dht(ctx, lambda dht: audit_run(dht, run_id, window=window, verify=verify))
    rows: list[dict[str, Any]] = [a.to_json() for a in audits]
    if not as_json:
        for row in rows:
            row["shares"] = {k[-6:]: round(v, 4) for k, v in row["shares"].items()}
            row["orchestrator"] = row["orchestrator"][-6:] if row["orchestrator"] else None
            row["problems"] = "; ".join(row["problems"])
    emit(rows, ("window", "orchestrator", "term", "ok", "shares", "problems"), as_json)
    if not audits or (verify and not all(a.ok for a in audits)):
        sys.exit(1)
