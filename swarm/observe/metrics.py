"""`/metrics`: the node's state in the Prometheus text format, read at scrape time by one `SwarmCollector`.

Nothing is instrumented: each scrape reads the live role, the transport's byte and latency counters
(`swarm.p2p.traffic`, `swarm.p2p.latency`), the averager's round counts (`swarm.averaging.stats`) and the
watcher's cached view of the swarm (`swarm.observe.watcher`). Each `Observer` has its own `CollectorRegistry`,
never the process-global one. Names follow the Prometheus conventions: ``swarm_`` prefix, the unit as a suffix,
``_total`` on counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from swarm.observe.health import Health
from swarm.observe.source import (
    NodeSource,
    averaging_stats,
    latest_own_loss,
    node_step,
    offenders,
    role_name,
    run_config,
    samples_counts,
    served_stage,
)
from swarm.observe.watcher import SwarmWatcher
from swarm.p2p.latency import LATENCY_BUCKETS_S

GROUP_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

METRIC_NAMES = (  # every family a scrape holds, as `text_string_to_metric_families` names them
    "swarm_node_info",
    "swarm_step",
    "swarm_samples_per_second",
    "swarm_tokens_per_second",
    "swarm_samples_driven",
    "swarm_samples_served",
    "swarm_training_loss",
    "swarm_eval_loss",
    "swarm_served_stage",
    "swarm_stage_peers",
    "swarm_stage_throughput_samples_per_second",
    "swarm_rpc_sent_bytes",
    "swarm_rpc_received_bytes",
    "swarm_rpc_latency_seconds",
    "swarm_rpc_errors",
    "swarm_averaging_group_size",
    "swarm_averaging_rounds",
    "swarm_averaging_failures",
    "swarm_averaging_alone",
    "swarm_verification_verdicts",
    "swarm_flagged_peers",
    "swarm_offender_peers",
    "swarm_reward_share_ratio",
    "swarm_attested_window",
    "swarm_dht_reachable",
    "swarm_connected_peers",
    "swarm_healthy",
)


class SwarmCollector(Collector):
    """Yields every family of `METRIC_NAMES` from the node's live state (see the module docstring)."""

    def __init__(self, source: NodeSource, watcher: SwarmWatcher, health: Callable[[], Health]) -> None:
        self.source = source
        self.watcher = watcher
        self.health = health

    def collect(self) -> Iterator[Metric]:
        yield from self._node()
        yield from self._training()
        yield from self._stages()
        yield from self._rpc()
        yield from self._averaging()
        yield from self._verification()
        yield from self._reachability()

    def _node(self) -> Iterator[Metric]:
        role = self.source.role()
        run = run_config(role)
        info = InfoMetricFamily("swarm_node", "This node: its PeerID, role and run")
        info.add_metric(
            [],
            {
                "peer_id": self.source.me.to_base58(),
                "role": role_name(role, self.source),
                "run_id": run.run_id if run is not None else "",
            },
        )
        yield info
        step = node_step(role)
        yield GaugeMetricFamily("swarm_step", "The optimizer step this node is at", value=step if step else 0)
        stage = served_stage(role)
        yield GaugeMetricFamily(
            "swarm_served_stage", "The pipeline stage this node serves (-1: none)", value=-1 if stage is None else stage
        )
        yield GaugeMetricFamily("swarm_healthy", "1 when /health answers 200", value=1 if self.health().ok else 0)

    def _training(self) -> Iterator[Metric]:
        role, view = self.source.role(), self.watcher.view
        run = run_config(role)
        samples_per_s = sum(r.samples_per_s for r in view.progress.values())
        seq_len = run.model.seq_len if run is not None else 0
        yield GaugeMetricFamily(
            "swarm_samples_per_second", "Samples per second of the whole swarm (its drivers' records)", samples_per_s
        )
        yield GaugeMetricFamily(
            "swarm_tokens_per_second", "Tokens per second of the whole swarm", value=samples_per_s * seq_len
        )
        driven, served = samples_counts(role)
        yield CounterMetricFamily("swarm_samples_driven", "Samples this node drove through the pipeline", driven)
        yield CounterMetricFamily("swarm_samples_served", "Samples the stage this node serves computed", served)
        curves = self.watcher.curves
        loss = latest_own_loss(role)
        if loss is None and curves.train:
            loss = curves.train[max(curves.train)]
        yield GaugeMetricFamily("swarm_training_loss", "The latest training loss (nats per token)", value=loss or 0.0)
        evaluated = curves.eval[max(curves.eval)] if curves.eval else 0.0
        yield GaugeMetricFamily("swarm_eval_loss", "The latest validation loss (nats per token)", value=evaluated)

    def _stages(self) -> Iterator[Metric]:
        run = run_config(self.source.role())
        view = self.watcher.view
        peers = GaugeMetricFamily(
            "swarm_stage_peers", "Peers serving each stage, in the run's records", labels=["stage"]
        )
        rate = GaugeMetricFamily(
            "swarm_stage_throughput_samples_per_second", "The stage's peers' summed throughput", labels=["stage"]
        )
        for stage in range(run.pipeline.num_stages if run is not None else 0):
            records = [r for r in view.peers.values() if r.stage == stage]
            peers.add_metric([str(stage)], len(records))
            rate.add_metric([str(stage)], sum(r.throughput for r in records))
        yield peers
        yield rate

    def _rpc(self) -> Iterator[Metric]:
        transport = self.source.transport
        traffic = transport.traffic.snapshot()
        sent = CounterMetricFamily("swarm_rpc_sent_bytes", "Wire bytes sent per RPC family", labels=["family"])
        received = CounterMetricFamily(
            "swarm_rpc_received_bytes", "Wire bytes received per RPC family", labels=["family"]
        )
        for family, size in sorted(traffic.sent_bytes.items()):
            sent.add_metric([family], size)
        for family, size in sorted(traffic.received_bytes.items()):
            received.add_metric([family], size)
        yield sent
        yield received
        latency = HistogramMetricFamily(
            "swarm_rpc_latency_seconds", "Time of this node's RPC calls to their reply", labels=["method"]
        )
        errors = CounterMetricFamily("swarm_rpc_errors", "This node's RPC calls that failed", labels=["method"])
        for method, entry in transport.latency.snapshot().items():
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), entry.bucket_counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([method], buckets, sum_value=entry.sum_s)
            errors.add_metric([method], entry.errors)
        yield latency
        yield errors

    def _averaging(self) -> Iterator[Metric]:
        stats = averaging_stats(self.source.role())
        sizes = HistogramMetricFamily("swarm_averaging_group_size", "Members of each averaging round's group")
        buckets, cumulative = [], 0
        group_sizes = stats.group_sizes if stats is not None else {}
        for bound in GROUP_SIZE_BUCKETS:
            cumulative = sum(n for size, n in group_sizes.items() if size <= bound)
            buckets.append((str(bound), cumulative))
        total = sum(group_sizes.values())
        buckets.append(("+Inf", total))
        sizes.add_metric([], buckets, sum_value=sum(size * n for size, n in group_sizes.items()))
        yield sizes
        rounds, failures, alone = (stats.rounds, stats.failures, stats.alone) if stats is not None else (0, 0, 0)
        yield CounterMetricFamily("swarm_averaging_rounds", "Averaging rounds this node took part in", rounds)
        yield CounterMetricFamily(
            "swarm_averaging_failures", "Averaging rounds that passed their deadline or broke", failures
        )
        yield CounterMetricFamily("swarm_averaging_alone", "Averaging rounds that averaged with nobody", alone)

    def _verification(self) -> Iterator[Metric]:
        verdicts = CounterMetricFamily(
            "swarm_verification_verdicts",
            "Validators' signed verdicts in the recent windows, by result (pass/fail) and subject (self/other)",
            labels=["result", "subject"],
        )
        totals = self.watcher.verdict_totals()
        for result in ("pass", "fail"):
            for subject in ("self", "other"):
                verdicts.add_metric([result, subject], totals[(result, subject)])
        yield verdicts
        attested = [f.attestation for f in self.watcher.attested() if f.attestation is not None]
        flagged = {p for attestation in attested for p in attestation.flagged}
        yield GaugeMetricFamily("swarm_flagged_peers", "Peers flagged in the recent attestations", len(flagged))
        yield GaugeMetricFamily(
            "swarm_offender_peers", "Peers this node caught cheating itself", len(offenders(self.source.role()))
        )
        last = attested[0] if attested else None
        share = last.share_map().get(self.source.me, 0.0) if last is not None else 0.0
        yield GaugeMetricFamily(
            "swarm_reward_share_ratio", "This node's share of the rewards in the last attested window", share
        )
        yield GaugeMetricFamily(
            "swarm_attested_window", "The last attested reward window (-1: none)", last.window if last else -1
        )

    def _reachability(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "swarm_dht_reachable",
            "1 when the last read of the DHT succeeded",
            1 if self.watcher.dht_error is None else 0,
        )
        yield GaugeMetricFamily(
            "swarm_connected_peers", "Peers with an open connection", len(self.source.transport.connected_peers())
        )


def metrics_registry(collector: SwarmCollector) -> CollectorRegistry:
    """A registry of its own holding ``collector`` (never the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
