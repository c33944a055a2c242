"""The training role's RPC handlers: `build_training_role` registers them all, `TrainingRole.stop` removes them all."""

from __future__ import annotations

import dataclasses

import pytest

from swarm.dht import DHT, DHTConfig
from swarm.errors import ConfigError, RemoteError
from swarm.p2p import Transport, TransportConfig
from swarm.p2p.identity import Identity
from swarm.run.config import RunConfig
from swarm.training.progress import StepHint, StepHintReply
from swarm.training.trainer import TrainingConfig, build_training_role

ROLE_METHODS = {
    "stage.forward",
    "stage.backward",
    "stage.eval",
    "state.download",
    "stage.tied",
    "step.hint",
    "verify.fetch",
    "avg.part",
    "avg.result",
    "avg.join",
    "avg.begin",
    "avg.ready",
    "avg.announce",
}


def _transport(seed: int) -> Transport:
    identity = Identity.from_seed(bytes([seed]) * 32)
    return Transport(identity, TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=3.0))


def _methods(transport: Transport) -> set[str]:
    return set(transport._handlers)


async def test_stop_unregisters_every_handler_and_a_new_role_can_register_again() -> None:
    base = RunConfig.from_toml()
    run = dataclasses.replace(base, verification=dataclasses.replace(base.verification, enabled=True))
    cfg = TrainingConfig(run=run, dht_timeout_s=3.0, rpc_timeout_s=3.0)
    transport, caller = _transport(1), _transport(2)
    await transport.start()
    await caller.start()
    dht = DHT.create(DHTConfig(), identity=transport.identity, transport=transport)
    await dht.start()
    try:
        before = _methods(transport)
        role = build_training_role(cfg, transport=transport, dht=dht)
        assert _methods(transport) - before == ROLE_METHODS
        with pytest.raises(ConfigError, match="already registered"):
            build_training_role(cfg, transport=transport, dht=dht)  # a second role on the same transport...
        assert _methods(transport) - before == ROLE_METHODS  # ...is refused and leaves the first one's handlers
        hint = StepHint(run_id=run.run_id, step=0)
        target = transport.listen_maddrs[0]
        assert await caller.call(target, "step.hint", hint, StepHintReply, timeout_s=3.0) == StepHintReply()

        role.stop()
        assert _methods(transport) == before  # the DHT's own handlers stay: the transport is shared
        with pytest.raises(RemoteError, match=r"step\.hint"):
            await caller.call(target, "step.hint", hint, StepHintReply, timeout_s=3.0)

        again = build_training_role(cfg, transport=transport, dht=dht)
        assert _methods(transport) - before == ROLE_METHODS
        again.stop()
        assert _methods(transport) == before
    finally:
        await dht.shutdown()
        await caller.stop()
        await transport.stop()
