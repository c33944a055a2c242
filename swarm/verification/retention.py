"""The server's bounded window of retained work and the ``verify.fetch`` RPC that serves it to validators."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from swarm.p2p.identity import PeerID
from swarm.p2p.messages import Message
from swarm.configs import Config, setting
from swarm.verification.receipts import KINDS, MAX_ID_CHARS

log = logging.getLogger(__name__)

FETCH_METHOD = "verify.fetch"


class RetentionConfig(Config, section="retention"):
    """How much served work a stage server keeps for validators: the last ``window_steps`` steps, at most
    ``max_bytes`` in all (oldest dropped first)."""

    window_steps: int = setting(default=8, ge=1, le=100_000, doc="Steps of served work kept.")
    max_bytes: int = setting(default=512 * 1024 * 1024, ge=1024, le=1 << 40, doc="Most bytes of served work kept.")


WorkKey = tuple[int, int, str, str]  # step, stage, microbatch id, kind


@dataclass(frozen=True, kw_only=True)
class RetainedWork:
    """The wire payloads of one served microbatch: what came in and what went out."""

    inputs: tuple[bytes, ...]
    outputs: tuple[bytes, ...]
    weights: bytes = b""  # the digest of the weights that computed it (as its work claim names them)

    @property
    def size_bytes(self) -> int:
        return sum(map(len, self.inputs)) + sum(map(len, self.outputs))


class RetentionStore:
    """A bounded map from (step, stage, microbatch, kind) to retained payloads."""

    def __init__(self, cfg: RetentionConfig) -> None:
        self.cfg = cfg
        self._items: OrderedDict[WorkKey, RetainedWork] = OrderedDict()
        self._size_bytes = 0
        self._latest_step = -1

    def put(
        self,
        *,
        step: int,
        stage: int,
        microbatch_id: str,
        kind: str,
        inputs: Sequence[bytes],
        outputs: Sequence[bytes],
        weights: bytes = b"",
    ) -> None:
        """Retain one served microbatch; evicts what falls out of the step window or the byte budget."""
        key = (step, stage, microbatch_id, kind)
        work = RetainedWork(
            inputs=tuple(bytes(x) for x in inputs), outputs=tuple(bytes(x) for x in outputs), weights=weights
        )
        old = self._items.pop(key, None)
        if old is not None:
            self._size_bytes -= old.size_bytes
        self._items[key] = work
        self._size_bytes += work.size_bytes
        self._latest_step = max(self._latest_step, step)
        self._evict()

    def get(self, *, step: int, stage: int, microbatch_id: str, kind: str) -> RetainedWork | None:
        """The retained payloads, or None if never served or already out of the window."""
        if step <= self._latest_step - self.cfg.window_steps:
            return None
        return self._items.get((step, stage, microbatch_id, kind))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    def _evict(self) -> None:
        oldest_kept = self._latest_step - self.cfg.window_steps + 1
        while self._items and next(iter(self._items))[0] < oldest_kept:
            _, work = self._items.popitem(last=False)
            self._size_bytes -= work.size_bytes
        while self._size_bytes > self.cfg.max_bytes and len(self._items) > 1:
            _, work = self._items.popitem(last=False)
            self._size_bytes -= work.size_bytes


@dataclass(frozen=True, kw_only=True)
class FetchRequest(Message):
    """Ask a server for the retained input and output of one microbatch it served."""

    run_id: str
    step: int
    stage: int
    microbatch_id: str
    kind: str

    def __post_init__(self) -> None:
        if self.step < 0 or self.stage < 0 or self.kind not in KINDS or not 0 < len(self.microbatch_id) <= MAX_ID_CHARS:
            raise ValueError("step/stage must be >= 0, kind forward|backward, microbatch_id 1..128 chars")


@dataclass(frozen=True, kw_only=True)
class FetchReply(Message):
    """The retained payloads, or found=False when the server no longer (or never) had them."""

    found: bool
    inputs: list[bytes]
    outputs: list[bytes]
    weights: bytes = b""  # the digest of the weights that computed the work, as the server retained it


class FetchService:
    """The stage server's side of ``verify.fetch``: serves its retention store."""

    def __init__(self, run_id: str, store: RetentionStore) -> None:
        self.run_id = run_id
        self.store = store

    async def rpc_fetch(self, ctx: Any, req: FetchRequest) -> FetchReply:
        """Answer with the retained payloads; found=False if this run/microbatch is not retained."""
        work = None
        if req.run_id == self.run_id:
            work = self.store.get(step=req.step, stage=req.stage, microbatch_id=req.microbatch_id, kind=req.kind)
        peer = getattr(ctx, "peer_id", None)
        log.debug(
            "verify.fetch from %s: step %d stage %d %s %s -> %s",
            peer.short() if isinstance(peer, PeerID) else "?",
            req.step,
            req.stage,
            req.microbatch_id,
            req.kind,
            "found" if work else "missing",
        )
        if work is None:
            return FetchReply(found=False, inputs=[], outputs=[])
        return FetchReply(found=True, inputs=list(work.inputs), outputs=list(work.outputs), weights=work.weights)

    def register(self, transport: Any) -> None:
        """Serve ``verify.fetch`` on a `swarm.p2p.Transport`."""
        transport.register(FETCH_METHOD, FetchRequest, self.rpc_fetch)

    def unregister(self, transport: Any) -> None:
        """Stop serving ``verify.fetch`` (the transport is shared and stays up)."""
        transport.unregister(FETCH_METHOD)


async def call_fetch(transport: Any, server: PeerID, req: FetchRequest, timeout_s: float) -> FetchReply:
    """Client side of ``verify.fetch`` over a `swarm.p2p.Transport` (raises its TransportError/RemoteError)."""
    return await transport.call(server, FETCH_METHOD, req, FetchReply, timeout_s=timeout_s)
