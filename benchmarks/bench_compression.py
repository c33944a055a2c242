"""Compression benchmark: every codec on a 64 MiB fp32 Gaussian tensor, against hivemind in the same run.

For each of our codecs: compression ratio (raw bytes / wire bytes, header included), relative L2 error,
and encode+decode throughput in GB/s of raw tensor (``serialize_tensor`` + ``deserialize_tensor``, and
the chunked path ``iter_encode_chunks`` + ``decode_chunks``). For hivemind 1.1.12:
``serialize_torch_tensor`` + ``deserialize_torch_tensor`` with NONE, FLOAT16, UNIFORM_8BIT and
BLOCKWISE_8BIT; a decode that raises (hivemind's 8-bit types under NumPy 2) is recorded as
``{"error": ...}`` with its encode-only figures. Rounds are interleaved, best of ``--rounds`` is kept
(the machine is shared). Prints one JSON object as its last line.

    python benchmarks/bench_compression.py [--size-mib 64] [--rounds 3] [--skip-hivemind]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from swarm.compression import decode_chunks, deserialize_tensor, get_codec, iter_encode_chunks, serialize_tensor

OURS = ("none", "fp16", "bf16", "blockwise8", "uniform8", "topk")
COUNTERPART = {"none": "NONE", "fp16": "FLOAT16", "uniform8": "UNIFORM_8BIT", "blockwise8": "BLOCKWISE_8BIT"}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((y.float() - x).norm() / x.norm())


def run_ours(name: str, x: torch.Tensor) -> dict[str, Any]:
    codec = get_codec(name)
    enc_s, data = _timed(lambda: serialize_tensor(x, codec))
    dec_s, y = _timed(lambda: deserialize_tensor(data))
    chunk_s, y_chunked = _timed(lambda: decode_chunks(iter_encode_chunks(x, codec, chunk_size_bytes=1 << 20)))
    return {
        "encode_s": enc_s,
        "decode_s": dec_s,
        "chunked_s": chunk_s,
        "ratio": x.numel() * 4 / len(data),
        "rel_err": _rel_err(x, y),
        "rel_err_chunked": _rel_err(x, y_chunked),
    }


def run_hivemind(kind: str, x: torch.Tensor) -> dict[str, Any]:
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    compression_type = runtime_pb2.CompressionType.Value(kind)
    enc_s, message = _timed(lambda: serialize_torch_tensor(x, compression_type))
    result: dict[str, Any] = {"encode_s": enc_s, "ratio": x.numel() * 4 / message.ByteSize()}
    try:
        dec_s, y = _timed(lambda: deserialize_torch_tensor(message))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"[:300]
        result["rel_err_manual_decode"] = _rel_err(x, _hivemind_8bit_decode(kind, message.buffer))
        return result
    result.update(decode_s=dec_s, rel_err=_rel_err(x, y))
    return result


def _hivemind_8bit_decode(kind: str, buffer: bytes) -> torch.Tensor:
    """hivemind 1.1.12's own 8-bit extract, with its NumPy-2 bug (int() of a 1-element array) fixed,
    so its error can be compared with ours. Not timed: it is not hivemind's code path."""
    import numpy as np

    if kind == "UNIFORM_8BIT":
        size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=size, dtype=np.float32)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=np.uint8)
        return torch.as_tensor(codebook)[torch.as_tensor(quantized, dtype=torch.int64)]
    from bitsandbytes.functional import dequantize_blockwise

    absmax_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
    code_size = int(np.frombuffer(buffer, offset=8, count=1, dtype=np.int64)[0])
    absmax = np.frombuffer(buffer, offset=16, count=absmax_size, dtype=np.float32)
    code = np.frombuffer(buffer, offset=16 + absmax.nbytes, count=code_size, dtype=np.float32)
    quantized = np.frombuffer(buffer, offset=16 + absmax.nbytes + code.nbytes, dtype=np.uint8)
    return dequantize_blockwise(
        torch.as_tensor(quantized), absmax=torch.as_tensor(absmax), code=torch.as_tensor(code), blocksize=4096
    )


def _best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(rounds[0])
    for key in ("encode_s", "decode_s", "chunked_s"):
        if key in best:
            best[key] = min(r[key] for r in rounds)
    return best


def _gbps(size_bytes: int, seconds: float) -> float:
    return round(size_bytes / seconds / 1e9, 3)


def summarize(size_bytes: int, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"size_bytes": size_bytes, "ours": {}, "hivemind": {}, "vs_hivemind": {}}
    for name, r in ours.items():
        out["ours"][name] = {
            "ratio": round(r["ratio"], 3),
            "rel_err": round(r["rel_err"], 6),
            "GBps": _gbps(size_bytes, r["encode_s"] + r["decode_s"]),
            "encode_GBps": _gbps(size_bytes, r["encode_s"]),
            "chunked_GBps": _gbps(size_bytes, r["chunked_s"]),
            "rel_err_chunked": round(r["rel_err_chunked"], 6),
        }
    for kind, r in theirs.items():
        entry = {"ratio": round(r["ratio"], 3), "encode_GBps": _gbps(size_bytes, r["encode_s"])}
        if "error" in r:
            entry.update(error=r["error"], rel_err_manual_decode=round(r["rel_err_manual_decode"], 6))
        else:
            entry.update(rel_err=round(r["rel_err"], 6), GBps=_gbps(size_bytes, r["encode_s"] + r["decode_s"]))
        out["hivemind"][kind] = entry
    for name, kind in COUNTERPART.items():
        if kind not in out["hivemind"]:  # --skip-hivemind
            continue
        mine, other = out["ours"][name], out["hivemind"][kind]
        cmp: dict[str, Any] = {
            "counterpart": kind,
            "encode_speedup": round(mine["encode_GBps"] / other["encode_GBps"], 2),
        }
        if "error" in other:
            cmp["hivemind_error"] = other["error"][:80]
            cmp["err_ratio_vs_manual_decode"] = round(mine["rel_err"] / other["rel_err_manual_decode"], 3)
            cmp["goal_met"] = cmp["encode_speedup"] >= 1.0 and cmp["err_ratio_vs_manual_decode"] <= 1.0001
        else:
            cmp["speedup"] = round(mine["GBps"] / other["GBps"], 2)
            cmp["err_ratio"] = round(mine["rel_err"] / other["rel_err"], 3) if other["rel_err"] else None
            cmp["goal_met"] = cmp["speedup"] >= 1.0 and mine["rel_err"] <= other["rel_err"] * 1.0001
        out["vs_hivemind"][name] = cmp
    out["all_goals_met"] = all(c["goal_met"] for c in out["vs_hivemind"].values()) if out["vs_hivemind"] else None
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    x = torch.randn((args.size_mib << 20) // 4, generator=torch.Generator().manual_seed(0))
    ours: dict[str, list[dict[str, Any]]] = {name: [] for name in OURS}
    counterpart = {} if args.skip_hivemind else COUNTERPART
    theirs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in counterpart.values()}
    warm = x[: 1 << 16]  # imports, code tables, allocator: paid before timing
    for name in OURS:
        run_ours(name, warm)
        if name in counterpart:
            run_hivemind(counterpart[name], warm)
    for _ in range(args.rounds):  # interleaved: a noisy neighbour slows both sides alike
        for name in OURS:
            ours[name].append(run_ours(name, x))
            kind = counterpart.get(name)
            if kind is not None:
                theirs[kind].append(run_hivemind(kind, x))
    result = summarize(x.numel() * 4, {k: _best(v) for k, v in ours.items()}, {k: _best(v) for k, v in theirs.items()})
    result.update(
        rounds=args.rounds,
        torch_threads=torch.get_num_threads(),
        load_avg_1m=round(os.getloadavg()[0], 2),
        numpy=__import__("numpy").__version__,
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-hivemind", action="store_true", help="our codecs only (no comparison: a smoke run)")
    print(json.dumps(main(parser.parse_args())))
