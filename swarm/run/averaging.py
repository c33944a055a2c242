"""The run config's ``[averaging]`` section: how a stage's replicas combine their work (docs/averaging.md).

``mode = "every_step"`` (the default) all-reduces every step's mean gradients before the optimizer, so the replicas
of a stage hold identical weights at every step; with ``delayed_update = true`` it applies each step's averaged
gradients one step late (at the close of the next step), so the all-reduce runs while the next step computes
(`swarm.training.delayed`). ``mode = "local_sgd"`` (DiLoCo) lets each replica apply its inner
optimizer to its own gradients for ``inner_steps`` steps, then all-reduces the pseudo-gradient (its weights at the
last sync minus its weights now) and applies Nesterov SGD (``outer_lr``, ``outer_momentum``) to the weights of the
last sync (the defaults, lr 1 and momentum 0, are plain averaging: measured best for runs of a few syncs; DiLoCo's
0.7 and 0.9 are for runs of hundreds, docs/averaging.md); ``outer_compression = "topk_q"`` sends only the
``outer_topk_fraction`` largest entries of each tensor, quantized to ``outer_bits`` bits, with error feedback
(SparseLoCo). ``reduction`` applies to whichever all-reduce the mode runs.
"""

from __future__ import annotations

from swarm.configs import Config, setting

AVERAGING_MODES = ("every_step", "local_sgd")
OUTER_COMPRESSIONS = ("none", "topk_q")


class AveragingSettings(Config, section="averaging"):
    """How a stage's peers combine their work: every step's gradients (``every_step``) or, every ``inner_steps``
    steps, their pseudo-gradients with an outer Nesterov step (``local_sgd``); reduced by a plain weighted ``mean``
    or ``centered_clip`` (robust to a minority of peers sending huge or sign-flipped values; ``clip_tau`` is in
    norm units per part)."""

    mode: str = setting(default="every_step", choices=AVERAGING_MODES, doc="every_step or local_sgd (DiLoCo).")
    delayed_update: bool = setting(
        default=False,
        doc="every_step: apply each step's averaged gradients at the close of the next step (the all-reduce then "
        "overlaps the next step's compute; gradients are one step stale).",
    )
    reduction: str = setting(default="mean", choices=("mean", "centered_clip"), doc="mean or centered_clip.")
    clip_tau: float = setting(default=1.0, ge=1e-9, le=1e9, doc="centered_clip: clipping radius (gradient norm).")
    clip_iterations: int = setting(default=20, ge=1, le=10_000, doc="centered_clip: fixed-point iterations.")
    inner_steps: int = setting(default=34, ge=1, le=1_000_000, doc="local_sgd: steps between outer syncs.")
    outer_lr: float = setting(default=1.0, gt=0.0, le=10.0, doc="local_sgd: learning rate of the outer Nesterov SGD.")
    outer_momentum: float = setting(
        default=0.0, ge=0.0, lt=1.0, doc="local_sgd: momentum of the outer Nesterov SGD (0: plain averaging)."
    )
    outer_compression: str = setting(
        default="none",
        choices=OUTER_COMPRESSIONS,
        doc="local_sgd: none (fp32) or topk_q (top-k, quantized, with error feedback).",
    )
    outer_topk_fraction: float = setting(
        default=0.02, gt=0.0, le=1.0, doc="topk_q: share of each tensor's entries sent per sync."
    )
    outer_bits: int = setting(
        default=2, ge=1, le=8, doc="topk_q: bits per sent value (uniform levels, per-tensor scale)."
    )

    def validate(self) -> None:
        if self.delayed_update and self.mode != "every_step":
            raise self.invalid("delayed_update", f"applies to mode 'every_step' only, not {self.mode!r}")

    @property
    def local_sgd(self) -> bool:
        """Whether the stage's replicas train locally between outer syncs."""
        return self.mode == "local_sgd"

    def is_sync_step(self, step: int) -> bool:
        """local_sgd: whether closing ``step`` ends with an outer sync (every ``inner_steps``-th step)."""
        return (step + 1) % self.inner_steps == 0
