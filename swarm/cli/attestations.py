"""`swarm-dht attestations`: fetch a run's reward attestations, verify them, and write payouts.

    swarm-dht --initial-peers ... attestations --run RUN [--window W] [--verify [--payouts FILE.csv]] [--json]

With ``--verify`` every accepted attestation is checked: its signature, that shares sum to 1, its place in
the chain (previous digest, term) and that its shares and flags follow from the receipts, verdicts and
outlier reports stored in the DHT. Exits 1 if any window fails (or none is found). ``--payouts FILE.csv`` also
writes each peer's summed share over the windows that verify (`swarm.verification.payouts`), the windows left
out named in its header; the file is written whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from swarm.cli.dht_client import emit, json_option, run_with_dht
from swarm.verification.audit import audit_run
from swarm.verification.payouts import PayoutReport, payouts_from_audits


@click.command("attestations")
@click.option("--run", "run_id", required=True, help="Run id (the run config's hash).")
@click.option("--window", type=click.IntRange(min=0), default=None, help="Only this window (default: all, from 0).")
@click.option("--verify", is_flag=True, help="Recompute each attestation from the DHT's receipts and verdicts.")
@click.option(
    "--payouts",
    "payouts_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --verify: write each peer's summed share over the verified windows to this CSV file.",
)
@json_option
@click.pass_context
def attestations(
    ctx: click.Context, run_id: str, window: int | None, verify: bool, payouts_path: Path | None, as_json: bool
) -> None:
    """List (and with --verify, check) the run's accepted attestation of each window."""
    if payouts_path is not None:
        if not verify:
            raise click.UsageError("--payouts needs --verify: only windows whose attestation verifies are paid")
        _check_writable(payouts_path)
    audits = run_with_dht(ctx, lambda dht: audit_run(dht, run_id, window=window, verify=verify))
    if not audits:
        where = f"window {window}" if window is not None else "window 0"
        click.echo(
            f"error: no attestation of run {run_id!r} is stored for {where}: check the run id "
            "(swarm-dht stages shows a running swarm's) and that its windows were attested",
            err=True,
        )
        if payouts_path is not None:
            sys.exit(1)
    rows: list[dict[str, Any]] = [a.to_json() for a in audits]
    if not as_json:
        for row in rows:
            row["shares"] = {k[-6:]: round(v, 4) for k, v in row["shares"].items()}
            row["orchestrator"] = row["orchestrator"][-6:] if row["orchestrator"] else None
            row["problems"] = "; ".join(row["problems"])
    emit(rows, ("window", "orchestrator", "term", "ok", "shares", "problems"), as_json)
    if payouts_path is not None:
        report = payouts_from_audits(run_id, audits)
        _write_payouts(report, payouts_path)
        click.echo(
            f"wrote {payouts_path}: {len(report.peers)} peers over {len(report.counted)} verified windows "
            f"({report.first_window}..{report.last_window}); left out {len(report.left_out)} that do not verify",
            err=True,
        )
    if not audits or (verify and not all(a.ok for a in audits)):
        sys.exit(1)


def _check_writable(path: Path) -> None:
    """Refuse, before joining the swarm, a payouts path that cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise click.BadParameter(f"{path} is a directory", param_hint="--payouts")
    if not parent.is_dir():
        raise click.BadParameter(f"folder {parent} does not exist", param_hint="--payouts")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{path} is not writable", param_hint="--payouts")


def _write_payouts(report: PayoutReport, path: Path) -> None:
    """Write the CSV atomically (a temporary file beside it, then a rename); a failure exits 1 with the reason."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(report.to_csv(), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        click.echo(f"error: cannot write payouts to {path}: {e.strerror or e}", err=True)
        sys.exit(1)
