"""Tolerance checks between a validator's recomputation and a server's claimed output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from collections.abc import Sequence
from dataclasses import dataclass

from swarm.configs import Config, setting

if TYPE_CHECKING:
    import torch


class ToleranceConfig(Config, section="tolerance"):
    """How close a claimed output must be to the recomputed one (from the run config).

    A pair of tensors passes when their cosine similarity is at least ``min_cosine`` and the norm of the
    claimed one is within ``max_norm_ratio_deviation`` of the recomputed one; tensors whose norms are both
    below ``zero_norm`` count as equal (a legitimately zero gradient).
    """

    min_cosine: float = setting(default=0.99, ge=-1.0, le=1.0, doc="Least cosine similarity of claimed and recomputed.")
    max_norm_ratio_deviation: float = setting(
        default=0.01, ge=0.0, lt=1.0, doc="Most relative difference of the claimed norm from the recomputed one."
    )
    zero_norm: float = setting(default=1e-6, ge=0.0, lt=1.0, doc="Tensors with both norms below this count as equal.")


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """The outcome of comparing claimed tensors with recomputed ones."""

    passed: bool
    cosine: float
    norm_ratio: float
    reason: str


def compare_tensor(expected: torch.Tensor, claimed: torch.Tensor, cfg: ToleranceConfig) -> Comparison:
    """Compare one recomputed tensor with the claimed one under ``cfg``."""
    import torch  # here, not at import time: the run config imports this module and must stay light

    if tuple(expected.shape) != tuple(claimed.shape):
        return Comparison(
            passed=False,
            cosine=0.0,
            norm_ratio=0.0,
            reason=f"shape {tuple(claimed.shape)} != recomputed {tuple(expected.shape)}",
        )
    exp = expected.detach().reshape(-1).to(torch.float64)
    got = claimed.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(got).all()):
        return Comparison(passed=False, cosine=0.0, norm_ratio=0.0, reason="claimed output has NaN or inf")
    exp_norm, got_norm = float(exp.norm()), float(got.norm())
    if exp_norm <= cfg.zero_norm and got_norm <= cfg.zero_norm:
        return Comparison(passed=True, cosine=1.0, norm_ratio=1.0, reason="both zero")
    if exp_norm <= cfg.zero_norm or got_norm <= cfg.zero_norm:
        return Comparison(
            passed=False,
            cosine=0.0,
            norm_ratio=got_norm / max(exp_norm, 1e-300),
            reason=f"norm {got_norm:.3g} vs recomputed {exp_norm:.3g}: one of them is zero",
        )
    cosine = float(torch.dot(exp, got)) / (exp_norm * got_norm)
    ratio = got_norm / exp_norm
    if cosine < cfg.min_cosine:
        return Comparison(
            passed=False, cosine=cosine, norm_ratio=ratio, reason=f"cosine {cosine:.5f} < {cfg.min_cosine}"
        )
    if not math.isclose(ratio, 1.0, abs_tol=cfg.max_norm_ratio_deviation):
        return Comparison(
            passed=False,
            cosine=cosine,
            norm_ratio=ratio,
            reason=f"norm ratio {ratio:.5f} outside 1 +- {cfg.max_norm_ratio_deviation}",
        )
    return Comparison(passed=True, cosine=cosine, norm_ratio=ratio, reason="within tolerance")


def compare_outputs(
    expected: Sequence[torch.Tensor], claimed: Sequence[torch.Tensor], cfg: ToleranceConfig
) -> Comparison:
    """Compare lists of tensors pairwise; the first failure decides, else the worst cosine is reported."""
    if len(expected) != len(claimed):
        return Comparison(
            passed=False,
            cosine=0.0,
            norm_ratio=0.0,
            reason=f"{len(claimed)} output tensors, recomputation has {len(expected)}",
        )
    worst = Comparison(passed=True, cosine=1.0, norm_ratio=1.0, reason="no tensors")
    for i, (exp, got) in enumerate(zip(expected, claimed, strict=False)):
        result = compare_tensor(exp, got, cfg)
        if not result.passed:
            return Comparison(
                passed=False, cosine=result.cosine, norm_ratio=result.norm_ratio, reason=f"tensor {i}: {result.reason}"
            )
        if result.cosine <= worst.cosine:
            worst = result
    return worst
