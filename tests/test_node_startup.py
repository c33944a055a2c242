"""Start-up errors of `swarm-node start` (issue 13): a bad input is one clear error line on stderr and a non-zero
exit before the node listens, never a traceback, and never a node that joins and fails later."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from swarm.cli.node import main
from swarm.errors import ConfigError
from swarm.local.events import EventReader, ListeningEvent, StoppedEvent
from swarm.run.config import RunConfig

DEADLINE_S = 60


def _start(*args: str, events: Path | None = None) -> Result:
    extra = ["--events-file", str(events)] if events is not None else []
    return CliRunner().invoke(main, ["start", "--listen", "/ip4/127.0.0.1/tcp/0", *args, *extra])


def _assert_one_error_line(result: Result, expected: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception (a traceback)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.output and "listening on" not in result.stdout


def _text_run(tmp_path: Path, data_path: Path, **model: str) -> Path:
    factory = f'factory = "{model["factory"]}"\n' if "factory" in model else ""
    config = tmp_path / "run.toml"
    config.write_text(
        f'name = "text-run"\n[model]\nvocab_size = 256\n{factory}[data]\nsource = "text"\npath = "{data_path}"\n'
    )
    return config


def test_a_data_dir_below_a_regular_file_is_one_error_line(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("x")
    result = _start("--role", "dht", "--data-dir", str(regular / "sub"))
    _assert_one_error_line(result, f"data dir '{regular / 'sub'}' cannot be created")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_data_dir_under_proc_is_one_error_line() -> None:
    _assert_one_error_line(_start("--role", "dht", "--data-dir", "/proc/swarm-data"), "cannot be created")


def test_log_level_is_a_choice_of_the_valid_levels(tmp_path: Path) -> None:
    loud = _start("--role", "dht", "--data-dir", str(tmp_path), "--log-level", "LOUD")
    assert loud.exit_code == 2 and "Invalid value for '--log-level'" in loud.stderr
    regular = tmp_path / "file"
    regular.write_text("x")
    lower = _start("--role", "dht", "--data-dir", str(regular / "sub"), "--log-level", "debug")  # any case: accepted
    _assert_one_error_line(lower, "cannot be created")


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_an_empty_run_file_is_an_error(tmp_path: Path, text: str) -> None:
    config = tmp_path / "empty.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match="is empty"):
        RunConfig.from_toml(config)
    _assert_one_error_line(_start("--data-dir", str(tmp_path), "--config", str(config)), "is empty")


def test_a_missing_data_file_is_reported_before_listening(tmp_path: Path) -> None:
    config = _text_run(tmp_path, tmp_path / "missing.txt")
    events = tmp_path / "events.jsonl"
    result = _start("--data-dir", str(tmp_path / "d"), "--config", str(config), events=events)
    _assert_one_error_line(result, f"data.path '{tmp_path / 'missing.txt'}' is not a file")
    reader = EventReader(events)
    reader.poll()
    assert reader.first(ListeningEvent) is None  # it never listened
    stopped = reader.first(StoppedEvent)
    assert stopped is not None and stopped.error is not None and "data.path" in stopped.error


def test_a_too_short_data_file_is_reported(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("abc")
    result = _start("--data-dir", str(tmp_path / "d"), "--config", str(_text_run(tmp_path, short)))
    _assert_one_error_line(result, "fewer than one sample")


def test_an_unimportable_model_factory_is_reported_before_listening(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("hello swarm " * 100)
    config = _text_run(tmp_path, data, factory="swarm_no_such_module:make")
    result = _start("--data-dir", str(tmp_path / "d"), "--config", str(config))
    _assert_one_error_line(result, "model.factory 'swarm_no_such_module:make' cannot be imported")
    missing = _text_run(tmp_path, data, factory="tests.training.factory_example:no_such_function")
    _assert_one_error_line(_start("--data-dir", str(tmp_path / "d"), "--config", str(missing)), "cannot be imported")


def test_good_inputs_pass_the_check(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("hello swarm " * 100)
    RunConfig.from_toml(_text_run(tmp_path, data, factory="tests.training.factory_example:make")).check_inputs()
    RunConfig.from_toml().check_inputs()  # the default run has no local inputs


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_node_process_with_a_missing_data_file_exits_before_listening(tmp_path: Path) -> None:
    config = _text_run(tmp_path, tmp_path / "missing.txt")
    events = tmp_path / "events.jsonl"
    command = [sys.executable, "-m", "swarm.cli.node", "start", "--data-dir", str(tmp_path / "d")]
    proc = subprocess.run(
        [*command, "--config", str(config), "--events-file", str(events)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: data.path '{tmp_path / 'missing.txt'}' is not a file (data.source = 'text' reads a text file)"
    ]
    reader = EventReader(events)
    reader.poll()
    assert reader.first(ListeningEvent) is None and proc.stdout == ""
