"""`StageReplayer`: the validator's `swarm.verification.replay.Replayer` over the run's stage models.

It keeps the weights of each (stage, step, server) the validator downloaded (the last ``retention_steps`` steps)
and recomputes forward and backward with the functions `swarm.training.stage_server.StageServer` serves with
(`swarm.training.compute`), so a replay computes exactly what serving computed. `TransportFetcher` is the
validator's `swarm.verification.replay.Fetcher` over its transport.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from swarm.averaging.digests import weights_digest
from swarm.errors import CodecError
from swarm.model.stages import StageInputError, StageModel, build_stages
from swarm.p2p import Transport
from swarm.p2p.identity import PeerID
from swarm.run.config import RunConfig
from swarm.training.checkpoint import StageState
from swarm.training.compute import input_grad, loss_backward, outputs_backward, stage_forward, stage_loss
from swarm.training.stage_rpc import decode
from swarm.verification.replay import ReplayUnavailableError
from swarm.verification.retention import FetchReply, FetchRequest, call_fetch


class StageReplayer:
    """A `Replayer` over the run's stage models and the per-step weights this validator downloaded from each server.

        A check uses the weights the receipt names (their digest; any replica's downloaded state with that digest is
    them, which is what makes local_sgd mode checkable: replicas differ between outer syncs, and weights that synced
    agree again), else the weights the checked server itself had at that step (replicas differ for a while after a
        failed averaging round, and an honest server must not be flagged for that). If that server's state could
        not be downloaded (it refused or failed), the weights every other replica agreed on (two at least) are used; if
        its state was simply not fetched in time, the check is inconclusive.
    """

    def __init__(self, run: RunConfig, keep_steps: int) -> None:
        self.models: list[StageModel] = build_stages(run)
        self.keep = keep_steps * len(self.models) * 16
        self._states: OrderedDict[tuple[int, int, PeerID], tuple[bytes, dict[str, torch.Tensor]]] = OrderedDict()
        self.refused: set[tuple[int, int, PeerID]] = set()
        self._lock = threading.Lock()

    def has(self, stage: int, step: int, peer: PeerID) -> bool:
        return (stage, step, peer) in self._states

    def add_state(self, state: StageState, peer: PeerID) -> None:
        """Keep the parameters ``peer`` had at ``state.step`` (with their digest: `weights_digest` in the model's
        parameter order, as the server names its weights in its work claims)."""
        params = {k[len("param.") :]: v for k, v in sorted(state.tensors.items()) if k.startswith("param.")}
        names = (
            [name for name, _ in self.models[state.stage].named_parameters()] if state.stage < len(self.models) else []
        )
        digest = weights_digest(params[n] for n in names) if all(n in params for n in names) else b""
        with self._lock:
            self._states[(state.stage, state.step, peer)] = (digest, params)
            while len(self._states) > self.keep:
                self._states.popitem(last=False)

    def _weights_for(
        self, stage: int, step: int, server: PeerID | None, weights: bytes = b""
    ) -> dict[str, torch.Tensor]:
        if weights:  # the receipt names the weights: any replica's state with that digest is exactly them
            named = [v for (s, _, _), v in self._states.items() if s == stage and v[0] == weights]
            if named:
                return named[0][1]
        own = self._states.get((stage, step, server)) if server is not None else None
        if own is not None:
            return own[1]
        others = [v for (s, t, _), v in self._states.items() if s == stage and t == step]
        if server is not None and (stage, step, server) not in self.refused:
            raise ReplayUnavailableError(f"the weights {server.short()} had at step {step} were not downloaded")
        # agreement needs two replicas at least: one other replica may itself have diverged (a cheater
        # averaging alone), and checking an honest server against it would flag the honest server
        if len(others) < 2 or len({d for d, _ in others}) != 1:
            raise ReplayUnavailableError(f"no weights of stage {stage} at step {step} that two replicas agree on")
        return others[0][1]

    def _load(self, stage: int, step: int, server: PeerID | None, weights: bytes = b"") -> StageModel:
        params = self._weights_for(stage, step, server, weights)
        model = self.models[stage]
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name].to(p.dtype).reshape(p.shape))
        return model

    def recompute(
        self,
        *,
        stage: int,
        step: int,
        kind: str,
        inputs: Sequence[bytes],
        server: PeerID | None = None,
        weights: bytes = b"",
    ) -> list[torch.Tensor]:
        """Forward outputs, or the gradient w.r.t. the inputs, as `StageServer` computes them, with the weights
        whose digest is ``weights`` when some replica's state at hand has it, else ``server``'s at ``step``."""
        with self._lock:
            model = self._load(stage, step, server, weights)
            try:
                x = decode(inputs[0], "inputs", dtype=model.input_spec.dtype)
                if kind == "forward":
                    return [stage_forward(model, x)[1].detach()]
                if model.is_last:
                    leaf, loss = stage_loss(model, x, decode(inputs[1], "targets"))
                    loss_backward(loss, int(x.shape[0]))
                else:
                    leaf, out = stage_forward(model, x)
                    outputs_backward(out, decode(inputs[1], "grad_outputs", dtype=model.activation_dtype))
                grad = input_grad(leaf)
            except (StageInputError, IndexError) as e:
                raise ReplayUnavailableError(f"the receipt's inputs do not replay: {e}") from None
            finally:
                model.zero_grad(set_to_none=True)
            return [] if grad is None else [grad]

    def decode_outputs(self, *, stage: int, kind: str, outputs: Sequence[bytes]) -> list[torch.Tensor]:
        try:
            return [decode(o, "claimed outputs", dtype=torch.float32) for o in outputs]
        except StageInputError as e:
            raise CodecError(str(e)) from None


class TransportFetcher:
    """A `Fetcher` over the node's transport."""

    def __init__(self, transport: Transport, timeout_s: float) -> None:
        self.transport = transport
        self.timeout_s = timeout_s

    async def fetch(self, server: PeerID, req: FetchRequest) -> FetchReply:
        return await call_fetch(self.transport, server, req, self.timeout_s)
