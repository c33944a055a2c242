"""Overhead of verification on the serving path: ack + receipt per microbatch vs the stage compute itself.

Serves N microbatches of the default run's stage 1 (tiny GPT, fp32 activations on the wire) twice in the same
process: plain (compute + encode) and verified (compute + encode + retain + server ack + caller receipt), and
replays a sample of them as a validator would. Prints one JSON object as the last line with the per-microbatch
times and the ratio verified / plain (the comparison baseline is the unverified path in the same run).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import torch

from swarm.compression import Role
from swarm.p2p.identity import Identity
from swarm.training.checkpoint import capture_state
from swarm.run.config import RunConfig
from swarm.data import ShardedData
from swarm.model.optim import make_optimizer
from swarm.model.stages import build_stages
from swarm.training.stage_rpc import encode
from swarm.training.replayer import StageReplayer
from swarm.verification.replay import CheckConfig, ReceiptChecker
from swarm.verification.retention import FetchService
from swarm.verification.witness import ReceiptCollector, ServerWitness, WitnessConfig

NUM_MICROBATCHES = 100
ROUNDS = 5


class _Store:
    async def store(self, *args, **kwargs) -> bool:
        return True

    async def get(self, *args, **kwargs) -> None:
        return None


class _Fetcher:
    def __init__(self, service: FetchService) -> None:
        self.service = service

    async def fetch(self, server, req):
        return await self.service.rpc_fetch(None, req)


def main() -> None:
    torch.manual_seed(0)
    run = RunConfig.from_toml()
    stages = build_stages(run)
    stage0, stage1 = stages[0], stages[1] if len(stages) > 1 else stages[0]
    policy = run.codecs.policy()
    data = ShardedData(run, b"bench")
    server, caller = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    wcfg = WitnessConfig(run_id=run.run_id, window_steps=1000)
    witness, collector = ServerWitness(server, wcfg), ReceiptCollector(caller, wcfg, _Store())
    with torch.no_grad():
        acts = [stage0(data.microbatch(0, i).inputs) for i in range(NUM_MICROBATCHES)]
    wires = [encode(a, policy, Role.ACTIVATIONS) for a in acts]

    def plain() -> None:
        for a in acts:
            with torch.no_grad():
                encode(stage1(a), policy, Role.ACTIVATIONS)

    def verified(round_index: int) -> None:
        for i, a in enumerate(acts):
            with torch.no_grad():
                out = encode(stage1(a), policy, Role.ACTIVATIONS)
            kw = dict(
                step=0,
                stage=1,
                microbatch_id=f"mb-{round_index}-{i}",
                kind="forward",
                inputs=[wires[i]],
                outputs=[out],
                num_samples=int(a.shape[0]),
            )
            ack = witness.witness(caller=caller.peer_id, **kw)
            collector.record(server=server.peer_id, ack=ack, **kw)

    plain()  # warm-up
    plain_times, verified_times = [], []
    for round_index in range(ROUNDS):  # interleaved rounds, medians: the machine is shared
        t0 = time.perf_counter()
        plain()
        plain_times.append((time.perf_counter() - t0) / NUM_MICROBATCHES)
        t0 = time.perf_counter()
        verified(round_index)
        verified_times.append((time.perf_counter() - t0) / NUM_MICROBATCHES)
    plain_s, verified_s = statistics.median(plain_times), statistics.median(verified_times)

    replayer = StageReplayer(run, keep_steps=2)
    replayer.add_state(
        capture_state(stage1, make_optimizer(stage1.parameters(), run.optimizer), run_id=run.run_id, stage=1, step=0),
        server.peer_id,
    )
    checker = ReceiptChecker(
        Identity.from_seed(b"\x03" * 32),
        CheckConfig(sample_probability=1.0),
        replayer,
        _Fetcher(witness.service),
        rng=random.Random(0),
    )
    receipts = collector.pending()[:NUM_MICROBATCHES]
    t0 = time.perf_counter()
    verdicts = asyncio.run(checker.check_window(receipts, 0))
    check_s = (time.perf_counter() - t0) / len(receipts)
    result = {
        "benchmark": "verification_overhead",
        "microbatches": NUM_MICROBATCHES,
        "rounds": ROUNDS,
        "microbatch_samples": int(acts[0].shape[0]),
        "plain_serve_ms": round(plain_s * 1e3, 3),
        "verified_serve_ms": round(verified_s * 1e3, 3),
        "overhead_ratio": round(verified_s / plain_s, 3),
        "check_ms": round(check_s * 1e3, 3),
        "checks_passed": sum(v.passed for v in verdicts),
        "checks": len(verdicts),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
