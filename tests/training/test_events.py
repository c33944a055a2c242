"""Node events (`swarm.local.events`): written and read back line by line, partial lines wait, malformed lines and
a node that ends without the awaited event are clear errors; a real `swarm-node start --events-file` reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.local.events import (
    EventReader,
    EventWriter,
    ListeningEvent,
    NodeEvent,
    NodeEventError,
    ServingEvent,
    StoppedEvent,
    decode_event,
    encode_event,
)
from swarm.p2p.maddr import parse_maddr

EVENTS: list[NodeEvent] = [
    ListeningEvent(maddrs=["/ip4/127.0.0.1/tcp/1/p2p/x"]),
    ServingEvent(stage=1),
    ServingEvent(stage=None),
]


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "stopped", "error": "an earlier run"}\n')
    writer = EventWriter(path)  # empties the file: a reused path never mixes runs
    reader = EventReader(path)
    assert reader.poll() == []
    for event in EVENTS:
        writer.emit(event)
    writer.emit(StoppedEvent(error=None))
    assert reader.poll() == [*EVENTS, StoppedEvent()]
    assert reader.poll() == []
    assert reader.first(ServingEvent) == ServingEvent(stage=1) and reader.first(ListeningEvent) == EVENTS[0]
    assert json.loads(path.read_text().splitlines()[1]) == {"event": "serving", "stage": 1}


def test_a_partial_line_waits_for_its_end(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    line = encode_event(ServingEvent(stage=0))
    reader = EventReader(path)
    assert reader.poll() == []  # no file yet
    path.write_text(line[:7])
    assert reader.poll() == []
    with open(path, "a") as f:
        f.write(line[7:])
    assert reader.poll() == [ServingEvent(stage=0)]


@pytest.mark.parametrize(
    "line, match",
    [
        ("listening on /ip4/1.2.3.4/tcp/1", "not a JSON line"),
        ("[1]", "not a node event"),
        ('{"event": "exploded"}', "not a node event"),
        ('{"event": "serving", "stage": "1"}', "malformed 'serving' event"),
        ('{"event": "listening"}', "missing field 'maddrs'"),
        ('{"event": "serving", "stage": 1, "extra": 2}', "unknown fields"),
    ],
)
def test_malformed_lines_are_node_event_errors(tmp_path: Path, line: str, match: str) -> None:
    with pytest.raises(NodeEventError, match=match):
        decode_event(line)
    path = tmp_path / "events.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(NodeEventError, match=match):
        EventReader(path).poll()


async def test_wait_for_returns_the_event_once_written(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer, reader = EventWriter(path), EventReader(path)
    waiting = asyncio.create_task(reader.wait_for(ServingEvent, alive=lambda: True, poll_interval_s=0.01))
    writer.emit(EVENTS[0])
    await asyncio.sleep(0.05)
    assert not waiting.done()
    writer.emit(ServingEvent(stage=2))
    async with asyncio.timeout(10):
        assert await waiting == ServingEvent(stage=2)


async def test_a_node_that_ends_without_the_event_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer, reader = EventWriter(path), EventReader(path)
    writer.emit(EVENTS[0])
    async with asyncio.timeout(10):
        assert await reader.wait_for(ListeningEvent, alive=lambda: False) == EVENTS[0]  # written before it ended
        with pytest.raises(NodeEventError, match="ended before reporting 'serving'"):
            await reader.wait_for(ServingEvent, alive=lambda: False)
    with pytest.raises(TimeoutError, match="no 'serving' event"):
        reader.wait_for_blocking(ServingEvent, alive=lambda: True, timeout_s=0.1, poll_interval_s=0.01)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_swarm_node_start_reports_listening_and_stopped(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    args = ["start", "--role", "dht", "--data-dir", str(tmp_path), "--log-level", "WARNING"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm.cli.node", *args, "--events-file", str(events)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        reader = EventReader(events)
        listening = reader.wait_for_blocking(ListeningEvent, alive=lambda: proc.poll() is None, timeout_s=60)
        maddr = listening.maddrs[0]
        assert parse_maddr(maddr).peer_id is not None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"listening on {maddr}" in out  # the line for people is still printed
    reader.poll()
    assert reader.events == [listening, StoppedEvent(error=None)]
