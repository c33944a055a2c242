"""Every benchmark still runs: each script with tiny arguments in its own process group, its last line one JSON
object holding the figures its goals read. A benchmark that rots (an import moved, an output key renamed, a
second run in the same directory) is found here, not on the day of a measurement. The comparison peers that
need the ``bench`` extras (hivemind, the ``kademlia`` package, matplotlib) are skipped with the scripts' flags; the
benchmarks on the WAN test bed (docs/netbed.md) are skipped, with the reason, where it cannot run (not root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from swarm.testing.netbed import missing_requirements

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240.0

CASES: list[tuple[str, list[str], list[str]]] = [
    (
        "bench_allreduce.py",
        ["--size-mib", "1", "--peers", "2", "--rounds", "1", "--skip-hivemind"],
        [
            "swarm_median_s",
            "gloo_median_s",
            "swarm_over_gloo",
            "encrypted_floor_over_gloo",
            "swarm_peak_rss_over_tensor",
        ],
    ),
    (
        "bench_transport.py",
        ["--size-mib", "4", "--rounds", "1", "--rpcs", "50"],
        ["encrypted_MBps", "plain_socket_MBps", "ratio_encrypted_vs_plain", "rpc_rtt_p50_ms"],
    ),
    ("bench_compression.py", ["--size-mib", "1", "--rounds", "1", "--skip-hivemind"], ["ours", "all_goals_met"]),
    ("bench_dht.py", ["--sizes", "8", "--no-hivemind", "--no-kademlia"], ["swarm_n8", "goals"]),
    ("bench_verification.py", [], ["overhead_ratio", "checks_passed"]),
    (
        "bench_conn_flood.py",
        ["--handshaken", "20", "--silent", "20", "--sources", "2", "--window", "10", "--observe", "1"],
        ["handshaken", "silent", "legit_connected_under_both"],
    ),
    (
        "bench_convergence.py",
        ["--steps", "2", "--nodes", "2", "--skip-lossy", "--out-dir", "{tmp}"],
        ["final_loss_ratio", "tokens_per_s_ratio", "goals"],
    ),
    ("bench_nat.py", ["--size-mib", "8", "--skip-bed"], ["relay_cpu_ms_per_MB", "relayed_MBps", "direct_MBps"]),
    (
        "bench_traffic.py",
        [
            *("--config", "tiny_gpt", "--steps", "2", "--nodes", "2", "--blocks", "2", "--width", "32"),
            *("--heads", "4", "--seq-len", "16", "--batch", "16", "--microbatch", "8", "--ratio", "8"),
            *("--modes", "every_step,bottleneck,local_sgd", "--out-dir", "{tmp}"),
        ],
        ["dp_bytes_ratio", "activation_bytes_ratio", "final_loss_ratio", "tokens_per_s", "unavailable"],
    ),
    (  # the same on the WAN test bed: one node per emulated host (skipped where the bed cannot run)
        "bench_traffic.py",
        [
            *("--config", "tiny_gpt", "--steps", "2", "--nodes", "2", "--blocks", "2", "--width", "32"),
            *("--heads", "4", "--seq-len", "16", "--batch", "16", "--microbatch", "8"),
            *("--modes", "every_step,local_sgd", "--profile", "lan", "--out-dir", "{tmp}"),
        ],
        ["dp_bytes_ratio", "final_loss_ratio", "tokens_per_s", "tokens_per_s_ratio"],
    ),
    (
        "bench_rtt.py",
        ["--delays-ms", "0,5", "--steps", "1", "--warmup", "1", "--nodes", "2"],
        ["per_delay", "rtts_per_step"],
    ),
    (
        "bench_robustness.py",
        ["--steps", "3", "--nodes", "4", "--out-dir", "{tmp}"],
        ["final_loss_ratio_centered_clip", "final_loss_ratio_mean", "goals"],
    ),
    (
        "bench_wan.py",
        ["--profiles", "lan", "--steps", "2", "--hosts", "2", "--slope-delays-ms", "0.5", "--out-dir", "{tmp}"],
        ["rtts_per_step", "profiles", "ok"],
    ),
]
NEEDS_BED = {"bench_wan.py"}  # they run on the WAN test bed: root, `ip`, /dev/net/tun (and any with --profile)


def _needs_bed(script: str, args: list[str]) -> bool:
    return script in NEEDS_BED or "--profile" in args


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in a new process group; on timeout kill the whole group (the benchmarks start processes)."""
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args[1]} ran past {TIMEOUT_S}s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "keys"), CASES, ids=[c[0] + ("[bed]" if "--profile" in c[1] else "") for c in CASES]
)
def test_the_benchmark_runs_and_prints_its_figures_as_json(
    script: str, args: list[str], keys: list[str], tmp_path: Path
) -> None:
    if _needs_bed(script, args) and (why := missing_requirements()) is not None:
        pytest.skip(why)
    argv = [sys.executable, str(REPO / "benchmarks" / script), *(a.format(tmp=tmp_path) for a in args)]
    done = _run(argv)
    assert done.returncode == 0, f"{script} exited {done.returncode}; stderr tail:\n{done.stderr[-3000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing"
    result: Any = json.loads(lines[-1])
    assert isinstance(result, dict)
    missing = [k for k in keys if k not in result]
    assert not missing, f"{script}'s JSON lacks {missing}: {sorted(result)}"
    if script == "bench_traffic.py" and "--profile" in args:  # each mode ran on the bed: its hosts sent bytes
        for mode in ("every_step", "local_sgd"):
            run = result["modes"][mode]
            assert run["ok"] and all(b > 0 for b in run["bed_sent_bytes_per_step_per_host"]), run
    if script == "bench_wan.py":
        lan = result["profiles"]["lan"]
        assert result["ok"] and lan["s_per_step"] > 0 and lan["bytes_per_step_per_host"] > 0, lan
