"""bf16 compute (`swarm.model.precision`, `StageModel.forward`): autocast inside each stage, float32 parameters,
bf16 activations between stages, float32 logits and loss; ``fp32`` unchanged. CUDA and MPS runs are skipped here
when those devices are missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.model import PipelineModel, build_stages
from swarm.model.devices import mps_available
from swarm.model.precision import compute_dtype, precision_name
from swarm.run.config import RunConfig
from swarm.training.local_train import train_local
from tests.model.hf_configs import hf_run


def run(precision: str) -> RunConfig:
    batch = {"target_batch_size": 16, "microbatch_size": 8}
    return RunConfig.from_dict({"precision": {"compute": precision}, "batch": batch})


def batch(cfg: RunConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def loss_and_grads(cfg: RunConfig, device: str = "cpu") -> tuple[float, dict[str, torch.Tensor], PipelineModel]:
    model = PipelineModel(build_stages(cfg)).to(device)
    inputs, targets = batch(cfg)
    loss = model.loss(inputs.to(device), targets.to(device))
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, model


def test_precision_names_map_to_dtypes() -> None:
    assert compute_dtype("fp32") == torch.float32 and compute_dtype("bf16") == torch.bfloat16
    assert precision_name(torch.bfloat16) == "bf16"


def test_precision_is_part_of_the_run_id() -> None:
    assert run("bf16").run_id != run("fp32").run_id
    assert RunConfig().precision.compute == "fp32"


def test_bf16_stages_pass_bf16_activations_and_keep_fp32_weights() -> None:
    cfg = run("bf16")
    stages = build_stages(cfg)
    inputs, _ = batch(cfg)
    hidden = stages[0](inputs)
    assert hidden.dtype == torch.bfloat16  # what goes on the wire
    assert stages[0].input_spec.dtype == torch.int64  # token ids stay ids
    assert stages[1].input_spec.dtype == torch.bfloat16
    stages[1].input_spec.check(hidden, stage=1, max_batch=64)  # bf16 activations pass the input checks
    logits = stages[1](hidden)
    assert logits.dtype == torch.float32  # the loss is computed in float32
    assert all(p.dtype == torch.float32 for s in stages for p in s.parameters())


def test_fp32_stages_compute_exactly_as_the_body() -> None:
    cfg = run("fp32")
    stages = build_stages(cfg)
    inputs, _ = batch(cfg)
    assert torch.equal(stages[0](inputs), stages[0].body(inputs))
    assert stages[1].input_spec.dtype == torch.float32


def check_bf16_close_to_fp32(device: str, fp32_run: RunConfig | None = None) -> None:
    fp32_run = fp32_run or run("fp32")
    bf16_run = fp32_run.from_dict({**fp32_run.to_dict(), "precision": {"compute": "bf16"}})
    fp32_loss, fp32_grads, _ = loss_and_grads(fp32_run, device)
    bf16_loss, bf16_grads, model = loss_and_grads(bf16_run, device)
    assert torch.isfinite(torch.tensor(bf16_loss))
    assert abs(bf16_loss - fp32_loss) < 0.02 * fp32_loss
    assert all(
        p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters()
    )
    for name, g in fp32_grads.items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), bf16_grads[name].flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))


def test_bf16_on_cpu_is_close_to_fp32() -> None:
    check_bf16_close_to_fp32("cpu")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_hf_families_on_cpu_are_close_to_fp32(tmp_path: Path, family: str) -> None:
    check_bf16_close_to_fp32("cpu", hf_run(tmp_path, family, num_stages=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_cuda_is_close_to_fp32() -> None:
    check_bf16_close_to_fp32("cuda")


@pytest.mark.skipif(not mps_available(), reason="needs MPS (Apple silicon)")
def test_bf16_on_mps_is_close_to_fp32() -> None:
    check_bf16_close_to_fp32("mps")


def test_single_process_bf16_training_keeps_fp32_state_and_learns() -> None:
    cfg = run("bf16")
    model, result = train_local(cfg, steps=3)
    _, fp32 = train_local(run("fp32"), steps=3)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]
    assert all(abs(a - b) < 0.05 for a, b in zip(result.losses, fp32.losses, strict=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())
