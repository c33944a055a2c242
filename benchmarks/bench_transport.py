"""Transport benchmark: a 256 MiB fp32 tensor and small RPCs between two node processes on loopback.

Measures, in the same run and interleaved (best of ``--rounds``, as the machine is shared):
- throughput of one tensor streamed through the encrypted transport (Noise + mux + flow control), chunked,
- the same bytes through a plain asyncio socket (StreamWriter.write + drain; StreamReader.read),
- p50/p99 round-trip time of a small typed RPC through the encrypted transport, and of a plain socket echo.
Both receivers copy the bytes into a preallocated tensor. Prints one JSON object as its last line.

    python benchmarks/bench_transport.py [--size-mib 256] [--chunk-kib 1024] [--rounds 3] [--rpcs 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from swarm.p2p.identity import Identity
from swarm.p2p.messages import Message
from swarm.p2p import RpcContext, Transport, TransportConfig


@dataclass(frozen=True, kw_only=True)
class Blob(Message):
    size_bytes: int = 0
    crc32: int = 0


def _tensor_bytes(size_bytes: int) -> memoryview:
    torch.manual_seed(0)
    tensor = torch.randn(size_bytes // 4, dtype=torch.float32)
    return memoryview(tensor.numpy()).cast("B")


async def serve(size_bytes: int) -> None:
    """The receiving node (child process): an encrypted sink, a plain socket sink and a plain echo."""
    sink = torch.zeros(size_bytes // 4, dtype=torch.float32)  # touched now, so no round pays its page faults
    sink_view = memoryview(sink.numpy()).cast("B")
    config = TransportConfig(listen_maddrs=("/ip4/127.0.0.1/tcp/0",), rpc_timeout_s=60)
    async with Transport(Identity.from_seed(b"\x01" * 32), config) as transport:

        async def receive(ctx: RpcContext, header: Blob, chunks: AsyncIterator[bytes]) -> tuple[Blob, None]:
            pos = 0
            async for chunk in chunks:
                sink_view[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            return Blob(size_bytes=pos), None

        async def checksum(ctx: RpcContext, request: Blob) -> Blob:
            return Blob(size_bytes=request.size_bytes, crc32=zlib.crc32(sink_view[: request.size_bytes]))

        async def echo(ctx: RpcContext, request: Blob) -> Blob:
            return request

        transport.register_stream("bench.receive", Blob, receive)
        transport.register("bench.checksum", Blob, checksum)
        transport.register("bench.echo", Blob, echo)

        async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            kind = await reader.readexactly(1)
            if kind == b"T":
                pos, expected = 0, int.from_bytes(await reader.readexactly(8), "big")
                while pos < expected and (data := await reader.read(1 << 20)):
                    sink_view[pos : pos + len(data)] = data
                    pos += len(data)
                writer.write(b"k")
            else:
                while data := await reader.read(64):
                    writer.write(data)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(plain, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"maddr": transport.listen_maddrs[0], "plain_port": port}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        server.close()


async def _encrypted_once(client: Transport, maddr: str, data: memoryview, chunk_bytes: int) -> float:
    async def chunks() -> AsyncIterator[memoryview]:
        for start in range(0, len(data), chunk_bytes):
            yield data[start : start + chunk_bytes]

    start = time.perf_counter()
    async with client.open_stream(maddr, "bench.receive", Blob(), Blob, chunks=chunks(), timeout_s=60) as stream:
        received = stream.reply.size_bytes
    elapsed = time.perf_counter() - start
    if received != len(data):
        raise RuntimeError(f"the receiver got {received} bytes, not {len(data)}")
    return len(data) / elapsed


async def _plain_once(port: int, data: memoryview, chunk_bytes: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"T" + len(data).to_bytes(8, "big"))
    start = time.perf_counter()
    for offset in range(0, len(data), chunk_bytes):
        writer.write(data[offset : offset + chunk_bytes])
        await writer.drain()
    await reader.readexactly(1)
    elapsed = time.perf_counter() - start
    writer.close()
    return len(data) / elapsed


async def _rtts(client: Transport, maddr: str, port: int, count: int) -> tuple[list[float], list[float]]:
    await client.call(maddr, "bench.echo", Blob(), Blob)
    rpc = []
    for i in range(count):
        start = time.perf_counter()
        await client.call(maddr, "bench.echo", Blob(size_bytes=i), Blob)
        rpc.append(time.perf_counter() - start)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"E")
    plain = []
    for i in range(count):
        start = time.perf_counter()
        writer.write(b"%8d" % i)
        await reader.readexactly(8)
        plain.append(time.perf_counter() - start)
    writer.close()
    return rpc, plain


def _ms(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[int(q * 100) - 1] * 1000, 4)


async def main(args: argparse.Namespace) -> dict[str, object]:
    size_bytes = args.size_mib << 20
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        "--size-mib",
        str(args.size_mib),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        async with asyncio.timeout(60):
            info = json.loads(await child.stdout.readline())
        data = _tensor_bytes(size_bytes)
        client = Transport(Identity.from_seed(b"\x02" * 32), TransportConfig(rpc_timeout_s=60))
        async with client:
            warmup = data[: min(len(data), 64 << 20)]  # both paths once, unmeasured (allocator, caches, connection)
            await _encrypted_once(client, info["maddr"], warmup, args.chunk_kib << 10)
            await _plain_once(info["plain_port"], warmup, args.chunk_kib << 10)
            encrypted, plain = [], []
            for _ in range(args.rounds):
                encrypted.append(await _encrypted_once(client, info["maddr"], data, args.chunk_kib << 10))
                plain.append(await _plain_once(info["plain_port"], data, args.chunk_kib << 10))
            check = await client.call(info["maddr"], "bench.checksum", Blob(size_bytes=size_bytes), Blob)
            if check.crc32 != zlib.crc32(data):
                raise RuntimeError("the tensor arrived corrupted (crc32 mismatch)")
            rpc, plain_rtt = await _rtts(client, info["maddr"], info["plain_port"], args.rpcs)
        child.stdin.close()
        async with asyncio.timeout(30):
            await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    best_enc, best_plain = max(encrypted), max(plain)
    return {
        "bench": "transport",
        "tensor_bytes": size_bytes,
        "chunk_bytes": args.chunk_kib << 10,
        "cipher": "Noise_XX_25519_AESGCM_SHA256",
        "encrypted_MBps": round(best_enc / 1e6, 1),
        "plain_socket_MBps": round(best_plain / 1e6, 1),
        "ratio_encrypted_vs_plain": round(best_enc / best_plain, 3),
        "goal_ratio": 0.7,
        "encrypted_MBps_rounds": [round(v / 1e6, 1) for v in encrypted],
        "plain_socket_MBps_rounds": [round(v / 1e6, 1) for v in plain],
        "rpc_rtt_p50_ms": _ms(rpc, 0.5),
        "rpc_rtt_p99_ms": _ms(rpc, 0.99),
        "plain_echo_rtt_p50_ms": _ms(plain_rtt, 0.5),
        "plain_echo_rtt_p99_ms": _ms(plain_rtt, 0.99),
        "goal_rpc_rtt_p50_ms": 0.5,
        "num_rpcs": args.rpcs,
        "corrupted": False,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rpcs", type=int, default=2000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        asyncio.run(serve(arguments.size_mib << 20))
    else:
        print(json.dumps(asyncio.run(main(arguments))))
