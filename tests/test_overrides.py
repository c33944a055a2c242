"""``--set FIELD=VALUE``: overrides of run-config fields, applied to the parsed TOML like an edit of the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from swarm.cli.dht import main as dht_main
from swarm.cli.node import main as node_main
from swarm.configs import apply_overrides, parse_value
from swarm.errors import ConfigError
from swarm.run.config import RunConfig


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 0.001),
        ("3", 3),
        ("-2.5", -2.5),
        ("true", True),
        ('"text"', "text"),
        ("'text'", "text"),
        ("[1, 2]", [1, 2]),
        ("adamw", "adamw"),  # not TOML: the bare string
        ("a b", "a b"),
        ("", ""),
        ("1\nother = 2", "1\nother = 2"),  # one value only, never a second key
    ],
)
def test_values_are_read_as_toml_else_as_a_string(text: str, value: object) -> None:
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_apply_overrides_sets_nested_fields_and_leaves_the_input_alone() -> None:
    data = {"optimizer": {"lr": 0.1}}
    out = apply_overrides(data, ["optimizer.lr=1e-3", "batch.microbatch_size=4", "seed=7"], RunConfig)
    assert out == {"optimizer": {"lr": 0.001}, "batch": {"microbatch_size": 4}, "seed": 7}
    assert data == {"optimizer": {"lr": 0.1}}
    assert apply_overrides({}, ["optimizer.name=sgd", "optimizer.name=adamw"]) == {"optimizer": {"name": "adamw"}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lrr=1", "override 'optimizer.lrr': no field 'optimizer.lrr'; known here: name, lr"),
        ("optimiser.lr=1", "no field 'optimiser'"),
        ("seed.value=1", "seed is a value, not a section"),
        ("optimizer.lr", "write FIELD=VALUE"),
        ("=1", "write FIELD=VALUE"),
    ],
)
def test_an_unknown_path_is_an_error_naming_it(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.load(None, [override])
    assert message in str(info.value)


def test_bad_override_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.lr must be a number, got 'fast'"):
        RunConfig.load(None, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match=r"optimizer\.lr must be a number in \[0\.0, 10\.0\], got 11"):
        RunConfig.load(None, ["optimizer.lr=11"])
    with pytest.raises(ConfigError, match=r"pipeline\.num_stages must be an int, got True"):
        RunConfig.load(None, ["pipeline.num_stages=true"])


def test_an_override_changes_the_run_id_exactly_as_an_edit_of_the_file(tmp_path: Path) -> None:
    default = RunConfig.load()
    line = f"lr = {json.dumps(default.optimizer.lr)}\n"
    text = default.to_toml()
    assert text.count(line) == 1
    edited = tmp_path / "edited.toml"
    edited.write_text(text.replace(line, "lr = 0.0123\n"))
    from_file = RunConfig.from_toml(edited)
    overridden = RunConfig.load(None, ["optimizer.lr=0.0123"])
    assert overridden == from_file and overridden.run_id == from_file.run_id != default.run_id
    same = RunConfig.load(None, [f"optimizer.lr={default.optimizer.lr!r}"])
    assert same.run_id == default.run_id  # the same value: the same run
    stage_costs = RunConfig.load(None, ["verification.stage_costs=[1.0, 2.5]"])
    assert stage_costs.verification.stage_costs == (1.0, 2.5) and stage_costs.run_id != default.run_id
    assert RunConfig.load(edited, ["name=other"]).run_id.startswith("other-")


def test_overrides_apply_on_top_of_a_preset() -> None:
    robust = RunConfig.load("tiny_gpt_robust")
    changed = RunConfig.load("tiny_gpt_robust", ["averaging.clip_iterations=7"])
    assert changed.averaging.clip_iterations == 7 and changed.averaging.reduction == robust.averaging.reduction


# ---- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["start", "--set", "optimizer.nope=1"],
        ["local", "--nodes", "2", "--set", "optimizer.nope=1"],
        ["export", "--initial-peers", "/ip4/127.0.0.1/tcp/9", "--out", "x.safetensors", "--set", "optimizer.nope=1"],
    ],
)
def test_swarm_node_commands_take_set(args: list[str], tmp_path: Path) -> None:
    """A bad override fails before any node, process or connection starts, naming the path."""
    result = CliRunner().invoke(node_main, [*args, *(["--data-dir", str(tmp_path)] if args[0] == "start" else [])])
    assert result.exit_code == 1, result.output
    assert "optimizer.nope" in result.output


def test_swarm_dht_stages_takes_set() -> None:
    result = CliRunner().invoke(dht_main, ["stages", "--set", "optimizer.lr=fast"])
    assert result.exit_code == 1 and "optimizer.lr must be a number" in result.output


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_swarm_dht_stages_reports_the_overridden_run_id(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarm.cli.node",
            "start",
            "--role",
            "dht",
            "--data-dir",
            str(tmp_path),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert node.stdout is not None
        line = node.stdout.readline()  # printed as soon as the node listens; the test timeout bounds the wait
        assert line.startswith("listening on "), line
        args = ["--initial-peers", line.split()[-1], "--rpc-timeout", "10", "stages", "--json"]
        result = CliRunner().invoke(dht_main, [*args, "--set", "optimizer.lr=1e-3", "--set", "seed=5"])
        assert result.exit_code == 0, result.output
        expected = RunConfig.load(None, ["optimizer.lr=1e-3", "seed=5"]).run_id
        assert json.loads(result.stdout.strip().splitlines()[-1])["run_id"] == expected != RunConfig.load().run_id
    finally:
        node.terminate()
        node.communicate(timeout=30)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(240)
def test_local_passes_overrides_to_every_node(tmp_path: Path) -> None:
    """The nodes publish under the overridden run id, or the launcher would never see them train."""
    overrides = ["optimizer.lr=0.001", "seed=3"]
    proc = subprocess.run(
        [sys.executable, "-m", "swarm.cli.node", "local", "--nodes", "2", "--steps", "2", "--json"]
        + ["--run-dir", str(tmp_path / "run"), "--timeout", "200"]
        + [arg for o in overrides for arg in ("--set", o)],
        capture_output=True,
        text=True,
        timeout=230,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["run_id"] == RunConfig.load(None, overrides).run_id != RunConfig.load().run_id
    assert summary["steps"] >= 2
