"""Verification of work: receipts, replayed checks, verdicts, orchestrator election, reward attestations.

Imports `swarm.p2p` and `swarm.errors` only (docs/architecture.md has the layers); `swarm.training` plugs in
through the small Protocols here (`Replayer`, `Fetcher`, `RecordStore`). See docs/verification.md.
"""
