"""`Observer`: the node's HTTP endpoints on its own event loop (aiohttp), started and stopped with the node.

- ``/metrics``: Prometheus text format (`swarm.observe.metrics`);
- ``/health``: JSON, 200 or 503 with the reasons (`swarm.observe.health`);
- ``/``: the status page (``static/``, package data; no build step, no outside asset), which polls
- ``/api/status``: the swarm as the DHT shows it (`swarm.observe.status`).

Any other path answers 404. `start` binds ``HttpConfig.host:port`` (loopback unless told otherwise) and raises
`HttpServeError` when it cannot (a port in use); the watcher task it starts is cancelled by `stop`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from swarm.observe.config import HttpConfig, HttpServeError
from swarm.observe.health import Health, check_health
from swarm.observe.metrics import SwarmCollector, metrics_registry
from swarm.observe.source import NodeSource
from swarm.observe.status import status_json
from swarm.observe.watcher import SwarmWatcher

log = logging.getLogger(__name__)

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


class Observer:
    """The HTTP endpoints of one node; ``start()`` / ``stop()``; ``url`` once started."""

    def __init__(self, cfg: HttpConfig, source: NodeSource, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.source = source
        self.clock = clock
        self.watcher = SwarmWatcher(cfg, source, clock=clock)
        self.registry = metrics_registry(SwarmCollector(source, self.watcher, self.health))
        self.static = {name: (resources.files("swarm.observe") / "static" / name).read_bytes() for name in STATIC_FILES}
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The status page's URL (a wildcard host shown as loopback, where this machine reaches it)."""
        host = self.cfg.host
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def describe(self) -> str:
        """One line for people: where it serves, and who can reach it."""
        where = f"http://{self.cfg.host if ':' not in self.cfg.host else f'[{self.cfg.host}]'}:{self.port}/"
        if self.cfg.loopback:
            return (
                f"serving /metrics, /health and the status page on {where} (loopback only: other machines cannot "
                f"reach it; pass --http 0.0.0.0:{self.port} to open it)"
            )
        return f"serving /metrics, /health and the status page on {where} to every machine that reaches this one"

    def health(self) -> Health:
        return check_health(self.cfg, self.source, self.watcher, self.clock())

    async def start(self) -> None:
        """Bind and serve; HttpServeError (naming the address and what to do) if the address cannot be bound."""
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/api/status", self._status)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port, reuse_port=False)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            hint = "another program uses it; pick another port" if e.errno == errno.EADDRINUSE else "check the address"
            raise HttpServeError(
                f"--http {self.cfg.host}:{self.cfg.port}: cannot listen: {e.strerror or e} ({hint})"
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._task = asyncio.get_running_loop().create_task(self.watcher.run())
        log.info("node %s: %s", self.source.me.short(), self.describe())

    async def stop(self) -> None:
        """Stop the watcher and close the server (open requests end)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _page(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.static["index.html"], content_type="text/html", charset="utf-8")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(body=self.static[name], content_type=STATIC_FILES[name], charset="utf-8")

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _request: web.Request) -> web.Response:
        health = self.health()
        return web.json_response(health.to_json(), status=health.status_code)

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(status_json(self.source, self.watcher, self.health(), self.clock()))
