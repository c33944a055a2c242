"""One swarm node: its identity, its transport, its DHT, its role, and (``--http``) its HTTP endpoints.

``Node.run(stop_event)`` checks its inputs (the data dir, the run's data file and model factory) before anything
else, loads or creates the identity, listens (and serves HTTP, `swarm.observe`, when ``NodeConfig.http`` is set),
joins through the initial peers, serves until the event is set, and shuts down cleanly (no task left running).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from swarm.dht import DHT, DHTConfig
from swarm.p2p.identity import Identity, PeerID
from swarm.p2p.maddr import PeerAddress, parse_maddr
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.nat import NatServices
from swarm.p2p.reachability import ReachabilityConfig
from swarm.p2p.relay import RelayConfig
from swarm.configs import Config, setting
from swarm.errors import AddressError, ConfigError, SwarmError
from swarm.model.devices import check_precision, resolve_device
from swarm.observe import HttpConfig, NodeSource, Observer
from swarm.testing.misbehave import MisbehaveConfig, hooks_for
from swarm.training.schemas import with_run_schemas
from swarm.training.trainer import TrainingConfig, TrainingRole, build_training_role
from swarm.training.validator import ValidatorConfig, ValidatorRole

log = logging.getLogger(__name__)

IDENTITY_FILE_NAME = "identity.pem"


class NodeConfig(Config, section="node"):
    """What one node needs: where it listens (``transport.listen_maddrs``), whom it joins, where it keeps state.

    The identity key is ``identity_path`` when given (it must exist), else ``<data_dir>/identity.pem``
    (created with mode 0600 on first start).
    """

    transport: TransportConfig = setting(
        default_factory=lambda: TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",)),
        doc="Where the node listens, and the transport's limits.",
    )
    initial_peers: tuple[str, ...] = setting(default=(), doc="Multiaddrs (with /p2p/PeerID) of peers to join through.")
    data_dir: Path = setting(default_factory=lambda: Path.home() / ".swarm", doc="Directory of the node's state.")
    identity_path: Path | None = setting(default=None, doc="Key file to use instead of <data_dir>/identity.pem.")
    training: TrainingConfig | None = setting(default=None, doc="The training role (None: a DHT-only node).")
    validator: ValidatorConfig | None = setting(default=None, doc="The validator role, instead of training.")
    reachability: ReachabilityConfig = setting(
        default_factory=ReachabilityConfig,
        doc="Dial-back checks, --announce, relays and reverse connections behind NAT.",
    )
    relay: RelayConfig = setting(default_factory=RelayConfig, doc="The relay service a public node offers.")
    misbehave: MisbehaveConfig | None = setting(
        default=None, doc="--misbehave: the training role cheats on purpose (tests, demos); None: honest."
    )
    http: HttpConfig | None = setting(
        default=None, doc="--http: serve /metrics, /health and the status page here; None: no HTTP."
    )

    def validate(self) -> None:
        for maddr in self.initial_peers:
            try:
                parse_maddr(maddr)
            except AddressError as e:
                raise ConfigError(f"node.initial_peers: {e}") from None
        if self.validator is not None and self.training is not None:
            raise self.invalid("validator", "and training are exclusive: a node cannot both train and validate")

    @property
    def key_path(self) -> Path:
        return self.identity_path if self.identity_path is not None else self.data_dir / IDENTITY_FILE_NAME


def prepare_data_dir(path: Path) -> None:
    """Create the node's data dir (and its parents) if missing; ConfigError if it cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data dir {str(path)!r} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"data dir {str(path)!r} is not writable")


class Node:
    """A running node: owns its identity and transport; ``start()`` / ``stop()`` or ``run(stop_event)``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.identity: Identity | None = None
        self.transport: Transport | None = None
        self.dht: DHT | None = None
        self.role: TrainingRole | ValidatorRole | None = None
        self.observer: Observer | None = None
        self.nat: NatServices | None = None
        self._on_reachability: Callable[[str, tuple[str, ...]], None] | None = None

    @property
    def peer_id(self) -> PeerID:
        if self.identity is None:
            raise SwarmError("the node has not started yet; call start() first")
        return self.identity.peer_id

    @property
    def listen_maddrs(self) -> tuple[str, ...]:
        return self.transport.listen_maddrs if self.transport is not None else ()

    def check_inputs(self) -> None:
        """ConfigError (one line, naming what is wrong) unless the node can start: the data dir exists or can be
        created, the run's local inputs are usable (`RunConfig.check_inputs`: data file, model factory), and the
        training device is there and computes in the run's precision (`swarm.model.devices`)."""
        cfg = self.config
        prepare_data_dir(cfg.data_dir)
        role = cfg.training or cfg.validator
        if role is not None:
            role.run.check_inputs()
        if cfg.training is not None:  # a device that is not there fails here, before the node listens
            check_precision(resolve_device(cfg.training.device), cfg.training.run.precision.compute)

    async def start(self) -> None:
        """Check the inputs (`check_inputs`), load (or create) the identity and start listening. Does not join
        yet: see run()."""
        cfg = self.config
        self.check_inputs()
        if cfg.identity_path is not None:
            self.identity = Identity.load(cfg.identity_path)
        else:
            self.identity = Identity.load_or_create(cfg.key_path)
        self.transport = Transport(self.identity, cfg.transport)
        self.transport.on_peer_connected(self._on_peer_connected)
        await self.transport.start()
        log.info("node %s listening on %s", self.identity.peer_id.short(), ", ".join(self.listen_maddrs))
        # dial-backs, the relay service while public, our own reachability: docs/transport.md, "Reachability"
        self.nat = NatServices(self.transport, cfg.reachability, cfg.relay, on_change=self._on_reachability)
        self.nat.start()
        if cfg.http is not None:  # HttpServeError (e.g. a port in use) stops the start here
            source = NodeSource(
                transport=self.transport,
                dht=lambda: self.dht,
                role=lambda: self.role,
                expects_role=cfg.training is not None or cfg.validator is not None,
            )
            observer = Observer(cfg.http, source)
            await observer.start()
            self.observer = observer

    async def stop(self) -> None:
        """Stop serving: close every connection and wait for every task the node owns."""
        if self.observer is not None:
            await self.observer.stop()
        if self.nat is not None:
            await self.nat.stop()
        if self.dht is not None:
            await self.dht.shutdown()
        if self.transport is not None:
            await self.transport.stop()
            log.info("node %s stopped", self.peer_id.short())

    async def run(
        self,
        stop_event: asyncio.Event,
        *,
        on_listening: Callable[[tuple[str, ...]], None] | None = None,
        on_serving: Callable[[int | None], None] | None = None,
        on_http: Callable[[Observer], None] | None = None,
        on_reachability: Callable[[str, tuple[str, ...]], None] | None = None,
    ) -> None:
        """Start, report the listen multiaddrs (and the HTTP endpoints), join, serve until ``stop_event`` is set,
        then stop.

        With a training config the node runs its `TrainingRole` (which also ends at its ``max_steps``), built by
        `build_training_role`; its RPC handlers are unregistered when it ends.
        """
        self._on_reachability = on_reachability
        try:
            await self.start()
            if on_listening is not None:
                on_listening(self.listen_maddrs)
            if on_http is not None and self.observer is not None:
                on_http(self.observer)
            dht = await self._join()
            if self.config.training is not None and self.transport is not None:
                role = build_training_role(
                    self.config.training,
                    transport=self.transport,
                    dht=dht,
                    on_serving=on_serving,
                    hooks=hooks_for(self.config.misbehave),
                )
                self.role = role
                try:
                    await role.run(stop_event)
                finally:
                    role.stop()
            elif self.config.validator is not None and self.transport is not None and self.identity is not None:
                validator = ValidatorRole(
                    self.config.validator, transport=self.transport, dht=dht, identity=self.identity
                )
                self.role = validator
                await validator.run(stop_event)
            else:
                await stop_event.wait()
        finally:
            await self.stop()

    async def _join(self) -> DHT:
        """Join the DHT through the initial peers (BootstrapError if none answers; the first node has none)."""
        if self.transport is None:
            raise SwarmError("the node has not started yet; call start() first")
        dht = DHT.create(
            with_run_schemas(DHTConfig(initial_peers=self.config.initial_peers)),
            identity=self.identity,
            transport=self.transport,
        )
        await dht.start()
        self.dht = dht
        return dht

    def _on_peer_connected(self, peer_id: PeerID, addr: PeerAddress) -> None:
        log.info("node %s connected to peer %s (%s)", self.peer_id.short(), peer_id.short(), addr.to_maddr())
