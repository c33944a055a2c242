"""Device resolution (`swarm.model.devices`): ``auto`` picks CUDA, then MPS, then CPU; a device that is not there,
or cannot compute in the run's precision, is a ConfigError before the node listens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from swarm.errors import ConfigError
from swarm.model.devices import DEVICE_CHOICES, check_precision, cuda_available, mps_available, resolve_device
from swarm.node import Node, NodeConfig
from swarm.run.config import RunConfig
from swarm.training.training_config import TrainingConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_mps = pytest.mark.skipif(not mps_available(), reason="needs MPS (Apple silicon)")
no_gpu = pytest.mark.skipif(cuda_available() or mps_available(), reason="this machine has a GPU: auto picks it")


def test_auto_prefers_cuda_then_mps_then_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"  # always there


@no_gpu
def test_auto_is_cpu_without_a_gpu() -> None:
    assert resolve_device("auto") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available.*--device auto"):
        resolve_device("cuda")


@pytest.mark.skipif(mps_available(), reason="this machine has MPS")
def test_unavailable_mps_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"device 'mps' is not available"):
        resolve_device("mps")


def test_unknown_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="device must be one of"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match=r"training\.device"):
        TrainingConfig(run=RunConfig(), device="tpu")
    assert TrainingConfig(run=RunConfig(), device="auto").device == "auto"
    assert DEVICE_CHOICES == ("auto", "cpu", "cuda", "mps")


def test_cpu_computes_in_both_precisions() -> None:
    check_precision("cpu", "fp32")
    check_precision("cpu", "bf16")  # CPU autocast supports bfloat16: allowed (slow on CPUs without bf16 units)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_node_with_a_missing_device_fails_before_it_listens(tmp_path: Path) -> None:
    node = Node(NodeConfig(data_dir=tmp_path, training=TrainingConfig(run=RunConfig(), device="cuda")))
    with pytest.raises(ConfigError, match="device 'cuda' is not available"):
        node.check_inputs()
    assert node.transport is None  # nothing listened


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_swarm_node_local_refuses_a_missing_device_before_starting_nodes(tmp_path: Path) -> None:
    from swarm.cli.training import local

    result = CliRunner().invoke(local, ["--nodes", "2", "--steps", "1", "--device", "cuda", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "device 'cuda' is not available" in result.output
    assert not list(tmp_path.glob("node-*"))  # no node process was started


@needs_cuda
def test_cuda_resolves_and_checks_bf16() -> None:
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("auto") == "cuda"
    if torch.cuda.is_bf16_supported():
        check_precision("cuda", "bf16")
    else:
        with pytest.raises(ConfigError, match="bfloat16 support"):
            check_precision("cuda", "bf16")


@needs_mps
def test_mps_resolves() -> None:
    assert resolve_device("mps") == "mps"
    check_precision("mps", "fp32")
