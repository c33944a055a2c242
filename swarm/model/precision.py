"""A run's compute precision (``[precision] compute``, `swarm.run.precision`) as torch dtypes and autocast.

``fp32``: plain float32, no autocast (bit for bit what swarm computed before precisions existed).
``bf16``: `StageModel` runs its body under ``torch.autocast(device_type, dtype=torch.bfloat16)`` (matmuls and
attention in bfloat16, norms, softmax and the loss in float32, as autocast decides), on CUDA, MPS and CPU alike.
The parameters stay float32 (autocast casts copies for each op), so the gradients and the optimizer state are
float32 too. Activations cross stage boundaries as bfloat16: that is what goes on the wire, and what a stage's
`InputSpec` accepts.
"""

from __future__ import annotations

import contextlib

import torch

from swarm.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of a stage's compute and activations for ``precision`` (``fp32`` or ``bf16``)."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ConfigError(f"precision.compute must be one of {tuple(_DTYPES)}, got {precision!r}") from None


def precision_name(dtype: torch.dtype) -> str:
    """The inverse of `compute_dtype`: ``torch.bfloat16`` -> ``"bf16"``."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"no precision computes in {dtype}")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[object]:
    """Autocast to ``dtype`` on ``device``'s type; no autocast at all for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
