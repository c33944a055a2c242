"""Verification of work: receipts, replayed checks, verdicts, orchestrator election, reward attestations.

Layer 3: imports `dht/`, `compression/` and `swarm.errors` only; the training code in `swarm/` plugs in
through the small Protocols here (`Replayer`, `Fetcher`, `RecordStore`). See docs/verification.md.
"""
