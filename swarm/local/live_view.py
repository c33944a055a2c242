"""The launcher's terminal view: one in-place `rich` Live frame on a terminal, plain lines anywhere else.

`LiveView` draws a `swarm.local.run_view.RunViewModel` (whose docstring defines every number shown) to a stream,
stderr in `swarm-node local` (stdout keeps the final line or the ``--json`` summary). On a terminal the frame is
redrawn in place: a progress bar (step k of N), loss, eval loss, samples/s, ETA, the dashboard URL when known,
and one row per stage with its peers, step and reachability. Elsewhere (a pipe, a file, CI) each refresh that
shows a new step or new peers prints one line, and the end prints one ``final:`` line.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from swarm.local.run_view import RunViewModel, StageRow

THROUGHPUT_NOTE = "samples/s: samples of completed steps ({batch} per step) per second of wall time"


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_eta(model: RunViewModel) -> str:
    if model.done:
        return "done"
    if model.step >= model.total_steps:
        return "finishing"
    if model.eta_s is None:
        return "-"
    minutes, seconds = divmod(round(model.eta_s), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _fmt_reach(row: StageRow) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(row.reachability.items())) or "-"


def _fmt_peers(row: StageRow, model: RunViewModel) -> str:
    if row.peers:
        return ", ".join(p[-6:] for p in row.peers)
    if not model.observed:
        return "(reading the run's records)"
    return "(none)" if model.finishing or model.done else "(none: waiting for a peer)"


def stats_line(model: RunViewModel) -> str:
    """Losses and samples/s in one line (shared by both views)."""
    evaluated = f"  eval {model.eval[1]:.3f} (step {model.eval[0]})" if model.eval is not None else ""
    rate = "-" if model.samples_per_s is None else f"{model.samples_per_s:.1f}"
    return f"loss {_fmt_loss(model.loss)}{evaluated}  samples/s {rate}"


def plain_line(model: RunViewModel) -> str:
    """The view as one line: step, stats, ETA, then each stage's peer count (and reachability when reported)."""
    stages = "; ".join(
        f"stage {r.stage}: {len(r.peers)} peers" + (f" ({_fmt_reach(r)})" if r.reachability else "")
        for r in model.stages
    )
    return f"step {model.step}/{model.total_steps}  {stats_line(model)}  ETA {_fmt_eta(model)}  |  {stages}"


def render(model: RunViewModel) -> RenderableType:
    """The in-place frame: header, progress bar, stats, the stage table, the throughput note."""
    header = Text("swarm-node local", style="bold")
    if model.dashboard_url:
        header.append(f"   dashboard {model.dashboard_url}", style="cyan")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=model.total_steps, completed=model.step, width=40),
        Text(f"step {model.step} of {model.total_steps}   ETA {_fmt_eta(model)}"),
    )
    show_reach = any(r.reachability for r in model.stages)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("stage", "peers", "step"):
        table.add_column(name, justify="right")
    if show_reach:
        table.add_column("reachability")
    table.add_column("peer ids")
    for row in model.stages:
        cells = [str(row.stage), str(len(row.peers)), "-" if row.step is None else str(row.step)]
        table.add_row(*cells, *([_fmt_reach(row)] if show_reach else []), _fmt_peers(row, model))
    note = Text(THROUGHPUT_NOTE.format(batch=model.batch_size), style="dim")
    return Group(header, bar, Text(stats_line(model)), table, note)


class LiveView:
    """Draws the model to ``stream``: in place on a terminal (``live=None``: ask the stream), else plain lines.

    ``start()``, ``refresh()`` after each model update, ``finish()`` once the model has the run's summary, and
    ``stop()`` (idempotent; a ``with`` block stops too). Lines that are not the view go through ``note()``."""

    def __init__(self, model: RunViewModel, *, stream: TextIO, live: bool | None = None, width: int | None = None):
        self.model = model
        self.stream = stream
        self.console = Console(file=stream, width=width, force_terminal=live, highlight=False)
        self.is_live = self.console.is_terminal and not self.console.is_dumb_terminal if live is None else live
        self._live: Live | None = None
        self._last_plain: tuple[object, ...] | None = None
        self._url_shown = False
        self._rerouted: list[tuple[logging.StreamHandler[Any], Any]] = []

    def start(self) -> None:
        if self.is_live and self._live is None:
            self._live = Live(
                render(self.model), console=self.console, auto_refresh=False, redirect_stdout=False, transient=False
            )
            self._live.start(refresh=True)
            self._route_logs(sys.stderr)  # Live's proxy for stderr prints above the frame, never into it

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(render(self.model), refresh=True)
            return
        if self.is_live:
            return  # not started, or stopped: nothing in place to redraw
        self._plain_url()
        key = (
            self.model.step,
            tuple((r.stage, r.peers, tuple(sorted(r.reachability.items()))) for r in self.model.stages),
        )
        if key != self._last_plain:
            self._last_plain = key
            self._print(plain_line(self.model))

    def finish(self) -> None:
        """Draw the final state (the model's ``finish`` was called) and stop."""
        if self._live is not None:
            self.refresh()
        elif self.is_live:
            self.console.print(render(self.model))
        else:
            self._plain_url()
            self._print("final: " + plain_line(self.model))
        self.stop()

    def note(self, text: str) -> None:
        """A line for people that is not part of the view (printed above the frame while it is live)."""
        if self._live is not None:
            self._live.console.print(Text(text))
        else:
            self._print(text)

    def stop(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            for handler, stream in self._rerouted:
                handler.setStream(stream)
            self._rerouted = []
            live.stop()

    def _route_logs(self, proxy: TextIO) -> None:
        """Point the root logger's handlers that write to our stream at ``proxy`` while the frame is live."""
        if proxy is self.stream:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                self._rerouted.append((handler, handler.stream))
                handler.setStream(proxy)

    def _plain_url(self) -> None:
        if self.model.dashboard_url and not self._url_shown:
            self._url_shown = True
            self._print(f"dashboard: {self.model.dashboard_url}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __enter__(self) -> LiveView:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
