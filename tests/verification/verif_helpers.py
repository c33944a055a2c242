"""Test doubles shared by the verification tests (a unique module name: imported as `verif_helpers`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swarm.p2p.identity import Identity

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StoredValue:
    value: Any
    expiration_time: float


class MemoryStore:
    """A RecordStore test double: subkeyed values with expirations, judged by an injected clock."""

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock or (lambda: 0.0)
        self.data: dict[str, dict[Any, StoredValue]] = {}
        self.fail_next = 0

    async def store(self, key: str, value: Any, expiration_time: float, subkey: str | None = None) -> bool:
        if expiration_time <= self.clock():
            return False
        self.data.setdefault(key, {})[subkey] = StoredValue(value, expiration_time)
        return True

    async def get(self, key: str, latest: bool = False) -> Any:
        now = self.clock()
        live = {k: v for k, v in self.data.get(key, {}).items() if v.expiration_time > now}
        if not live:
            return None
        if set(live) == {None}:
            return live[None]
        return live


def make_identity(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(name.encode()).digest())


def encode_tensor(t: torch.Tensor, dtype: str = "float32") -> bytes:
    """Test-only wire format for the stand-in stage (msgpack: shape, dtype, raw bytes)."""
    import msgpack
    import torch

    arr = t.detach().to(getattr(torch, dtype)).contiguous().numpy()
    return msgpack.packb({"shape": list(arr.shape), "dtype": dtype, "data": arr.tobytes()})


def decode_tensor(data: bytes) -> torch.Tensor:
    import msgpack
    import numpy as np
    import torch

    from swarm.errors import CodecError

    try:
        obj = msgpack.unpackb(data)
        arr = np.frombuffer(obj["data"], dtype=obj["dtype"]).reshape(obj["shape"])
    except Exception as e:
        raise CodecError(f"bad test tensor: {e}") from None
    return torch.from_numpy(arr.copy()).float()


class LinearStage:
    """A stand-in `Replayer`: stage s at step t is y = tanh(x W_t^T + b_t) with seeded per-step weights."""

    def __init__(self, dim: int = 16, available_steps: range = range(0, 1000)) -> None:
        self.dim = dim
        self.available_steps = available_steps

    def weights(self, stage: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        g = torch.Generator().manual_seed(1000 * stage + step)
        return torch.randn(self.dim, self.dim, generator=g) * 0.3, torch.randn(self.dim, generator=g) * 0.1

    def forward(self, stage: int, step: int, x: torch.Tensor) -> torch.Tensor:
        import torch

        w, b = self.weights(stage, step)
        return torch.tanh(x @ w.T + b)

    def backward(self, stage: int, step: int, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        import torch

        x = x.detach().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(self.forward(stage, step, x), x, grad_y)
        return grad_x

    # the Replayer Protocol
    def recompute(self, *, stage: int, step: int, kind: str, inputs: Any, server: Any = None) -> list:
        from swarm.verification.replay import ReplayUnavailableError

        if step not in self.available_steps:
            raise ReplayUnavailableError(f"no weights for step {step}")
        tensors = [decode_tensor(x) for x in inputs]
        if kind == "forward":
            return [self.forward(stage, step, tensors[0])]
        return [self.backward(stage, step, tensors[0], tensors[1])]

    def decode_outputs(self, *, stage: int, kind: str, outputs: Any) -> list:
        return [decode_tensor(x) for x in outputs]


class DirectFetcher:
    """A `Fetcher` that calls servers' FetchService objects in-process (or fails for unknown servers)."""

    def __init__(self, services: dict) -> None:
        self.services = services
        self.calls = 0

    async def fetch(self, server: Any, req: Any) -> Any:
        from swarm.errors import TransportError

        self.calls += 1
        if server not in self.services:
            raise TransportError(f"no route to {server.short()}")
        return await self.services[server].rpc_fetch(None, req)
