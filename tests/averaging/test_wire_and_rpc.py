"""The PartCodec Protocol's round trip, and bad avg.* requests: refused, logged, the node keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch

from swarm.p2p.messages import Message
from swarm.averaging.allreduce import AllReduceServer
from swarm.averaging.config import AveragerConfig
from swarm.averaging.matchmaking import Matchmaker
from swarm.averaging.messages import BeginReply, BeginRequest, JoinReply, JoinRequest, MemberInfo, PartAck, PartHeader
from swarm.averaging.wire import CompressionPartCodec, PartCodec
from swarm.errors import CodecError, ConfigError, RemoteError
from tests.averaging.conftest import transports


@pytest.mark.parametrize("name", ["none", "fp16", "blockwise8"])
def test_part_codec_round_trip(name: str) -> None:
    codec: PartCodec = CompressionPartCodec(name)
    values = torch.linspace(-2.0, 2.0, 5000)
    data = b"".join(codec.encode(values))  # the buffers go out as one frame: the receiver sees them joined
    decoded = torch.full((5000,), float("nan"))
    codec.decode_into(data, decoded)
    viewed = codec.decode(data, 5000)
    assert viewed.dtype == torch.float32 and torch.equal(viewed, decoded)
    assert (decoded - values).abs().max().item() <= (0.0 if name == "none" else 0.02)
    assert codec.inline == (name == "none")


def test_part_codec_rejects_wrong_size_garbage_and_unknown_names() -> None:
    codec = CompressionPartCodec("none")
    data = b"".join(codec.encode(torch.zeros(10)))
    nan_data = bytearray(b"".join(codec.encode(torch.ones(10))))
    nan_data[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    out = torch.full((11,), 7.0)
    for bad, slot in (
        (data, out),
        (data, out[:9]),
        (b"\x00" * 40, out[:10]),
        (data[:-4], out[:10]),
        (bytes(nan_data), out[:10]),
    ):  # wrong size either way, garbage, truncated, NaN
        with pytest.raises(CodecError):
            codec.decode_into(bad, slot)
        with pytest.raises(CodecError):
            codec.decode(bad, slot.numel())
        assert torch.equal(out, torch.full((11,), 7.0))  # a refused part leaves the slot unchanged
    with pytest.raises(ConfigError, match="codec"):
        CompressionPartCodec("zip")


class _NoDHT:
    """Matchmaking RPC handlers do not touch the DHT; calling it would be a bug."""

    async def store(self, key: str, value: object, expiration_time: float, subkey: object = None) -> bool:
        raise AssertionError("unexpected DHT store")

    async def get(self, key: str, latest: bool = False) -> object:
        raise AssertionError("unexpected DHT get")


async def test_bad_avg_requests_are_refused_and_the_node_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    cfg = AveragerConfig(join_timeout_s=0.5)
    async with transports(2, salt=9) as (a, b):
        server = AllReduceServer(cfg, b, CompressionPartCodec("none"))
        server.register()
        Matchmaker(cfg, b, _NoDHT(), server).register()
        leader = MemberInfo(peer_id=a.peer_id.to_bytes())
        # not looking under this key: declined, not an error
        reply = await a.call(b.peer_id, "avg.join", JoinRequest(group_key="k", leader=leader), JoinReply)
        assert not reply.accepted
        # a begin from a peer we never accepted as leader: declined
        begin = BeginRequest(group_key="k", round_id=b"r" * 32, members=(leader,))
        assert not (await a.call(b.peer_id, "avg.begin", begin, BeginReply)).accepted
        # parts for a round this peer never agreed to: an error reply
        with pytest.raises(RemoteError, match="not a member"):
            async with a.open_stream(
                b.peer_id,
                "avg.part",
                PartHeader(group_key="k", round_id=b"r" * 32, weight=1.0),
                PartAck,
                chunks=_chunks([b"x"]),
            ):
                pass
        # a malformed request (wrong field type): an error reply, the connection stays up
        with pytest.raises(RemoteError):
            await a.call(b.peer_id, "avg.join", _Raw(group_key=5), JoinReply)
        assert not (await a.call(b.peer_id, "avg.join", JoinRequest(group_key="k", leader=leader), JoinReply)).accepted
    assert any("avg.part" in r.getMessage() for r in caplog.records)


async def _chunks(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


@dataclass(frozen=True, kw_only=True)
class _Raw(Message):
    """A request with the wrong field type, as a buggy or hostile peer would send."""

    group_key: int
