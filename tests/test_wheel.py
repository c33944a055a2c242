"""The built wheel as a new user gets it: it holds only the `swarm` package (run presets included), installs into
a fresh virtualenv, and from a directory outside the checkout `swarm-node local` trains with the default run and
with a shipped preset named by ``--config``.

No network: the wheel is built without build isolation from a copy of the checkout (so the checkout gets no
build/ or egg-info), and the fresh virtualenv finds the dependencies (torch, ...) through a ``.pth`` file that
names this interpreter's site-packages, so only the wheel itself is installed into it (``--no-deps``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from swarm.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("gpt_stdlib", "llama_stdlib", "tiny_gpt", "tiny_gpt_checked", "tiny_gpt_robust", "tiny_llama")
HF_PRESETS = (
    "llama_150m",
    "llama_1b",
    "llama_20m",
    "llama_8b",
    "tiny_llama",
    "tiny_llama_2k",
)  # model configs: swarm/run/hf_presets
BUILD_TIMEOUT_S = 180.0
INSTALL_TIMEOUT_S = 180.0
PROBE_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 240.0  # the launcher's own --timeout; the process gets RUN_GRACE_S more before it is killed
RUN_GRACE_S = 45.0

# a bound on each test, the module's build and install (done by whichever test runs first) included
TEST_TIMEOUT_S = BUILD_TIMEOUT_S + 2 * INSTALL_TIMEOUT_S + RUN_TIMEOUT_S + 2 * RUN_GRACE_S

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT_S)]


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would make the checkout importable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", **extra}


def _run(args: list[str], *, cwd: Path, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run to completion within ``timeout_s`` (its whole process tree is killed past it); its stdout."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=env or _clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"{args[:4]} ran past {timeout_s:.0f}s; stderr tail:\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"{args[:4]} exited {proc.returncode}; stderr tail:\n{err[-3000:]}"
    return out


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` and every process it started (the launcher starts its nodes in their own sessions)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.kill()
    psutil.wait_procs(children, timeout=10)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout (only what the build reads: pyproject, README, swarm/)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    shutil.copytree(ROOT / "swarm", src / "swarm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    dist = work / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(src),
            "-w",
            str(dist),
        ],
        cwd=work,
        timeout_s=BUILD_TIMEOUT_S,
    )
    [built] = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with only the wheel installed; the dependencies come from this interpreter's
    site-packages through a ``.pth`` file. Yields its bin/ (Scripts/ on Windows) folder."""
    root = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent, timeout_s=INSTALL_TIMEOUT_S)
    bin_dir = root / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=root,
        timeout_s=PROBE_TIMEOUT_S,
    ).strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(purelib) / "_swarm_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=root,
        timeout_s=INSTALL_TIMEOUT_S,
    )
    yield bin_dir


def test_wheel_holds_only_the_swarm_package_and_its_presets(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["swarm"]
    dist_info = top_level.split("/")[0]
    assert {n.split("/")[0] for n in names} == {"swarm", dist_info}
    assert {f"swarm/run/presets/{p}.toml" for p in PRESETS} <= set(names)
    assert {f"swarm/run/hf_presets/{p}.json" for p in HF_PRESETS} <= set(names)
    assert "swarm/py.typed" in names
    assert {f"swarm/observe/static/{f}" for f in ("index.html", "app.js", "style.css")} <= set(names)  # the page


def test_installed_wheel_is_what_runs_and_its_presets_load(venv: Path, tmp_path: Path) -> None:
    probe = (
        "import json, swarm; from swarm.run.config import RunConfig, preset_names; "
        "print(json.dumps({'file': swarm.__file__, 'presets': list(preset_names()), "
        "'runs': {p: RunConfig.from_toml(p).run_id for p in preset_names()}}))"
    )
    out = json.loads(_run([str(venv / "python"), "-c", probe], cwd=tmp_path, timeout_s=PROBE_TIMEOUT_S))
    assert Path(out["file"]).resolve().is_relative_to(venv.parent.resolve()), out["file"]
    assert not Path(out["file"]).resolve().is_relative_to(ROOT), out["file"]
    assert tuple(out["presets"]) == PRESETS
    assert len(set(out["runs"].values())) == len(PRESETS)


def _local(venv: Path, cwd: Path, *args: str) -> dict[str, object]:
    """``swarm-node local --nodes 2 --json ARGS`` of the venv, from ``cwd``; its last stdout line as JSON."""
    run_dir = cwd / "run"
    out = _run(
        [
            str(venv / "swarm-node"),
            "local",
            "--nodes",
            "2",
            "--json",
            "--run-dir",
            str(run_dir),
            "--timeout",
            str(RUN_TIMEOUT_S),
            *args,
        ],
        cwd=cwd,
        timeout_s=RUN_TIMEOUT_S + RUN_GRACE_S,
    )
    lines = out.strip().splitlines()
    assert lines, "swarm-node local printed nothing on stdout"
    summary: dict[str, object] = json.loads(lines[-1])
    return summary


def test_installed_swarm_node_local_trains_with_the_default_run(venv: Path, tmp_path: Path) -> None:
    summary = _local(venv, tmp_path, "--steps", "3")
    assert summary["ok"] is True, summary
    assert isinstance(summary["steps"], int) and summary["steps"] >= 3, summary


def test_installed_swarm_node_local_runs_a_shipped_preset_by_name(venv: Path, tmp_path: Path) -> None:
    summary = _local(venv, tmp_path, "--steps", "1", "--config", "tiny_gpt_robust")
    assert summary["ok"] is True, summary
    assert summary["run_id"] == RunConfig.from_toml("tiny_gpt_robust").run_id, summary
    assert isinstance(summary["steps"], int) and summary["steps"] >= 1, summary
