"""`PrecisionConfig`: the ``[precision]`` section of a run: the dtype a stage computes in.

``compute = "fp32"`` (the default) computes everything in float32. ``compute = "bf16"`` runs each stage's forward
(and so its backward) under ``torch.autocast(device_type, dtype=torch.bfloat16)`` on every device (CUDA, MPS and
CPU), keeps the parameters and the optimizer state in float32 (the master weights), and sends activations and their
gradients between stages as bfloat16. Every node of a run computes the same way, so the field is part of the run id.
This module imports no torch: the run config stays light (`swarm.model.precision` maps the names to dtypes).
"""

from __future__ import annotations

from swarm.configs import Config, setting

PRECISIONS = ("fp32", "bf16")


class PrecisionConfig(Config, section="precision"):
    """The dtype of a stage's compute: ``fp32``, or ``bf16`` autocast with float32 weights and optimizer state."""

    compute: str = setting(
        default="fp32",
        choices=PRECISIONS,
        doc="fp32, or bf16 (autocast compute and bf16 activations; weights and optimizer state stay fp32).",
    )
