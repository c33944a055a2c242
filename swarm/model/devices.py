"""Which torch device a stage runs on: ``cpu``, ``cuda``, ``mps``, or ``auto`` (CUDA, then MPS, then CPU).

`resolve_device` is the one place a requested device becomes a concrete one: a node resolves its device before it
listens (`swarm.node.Node.check_inputs`) and when it builds its training role, so a device that is not there is a
`ConfigError` naming it, not a failure deep inside the first forward. `check_precision` refuses a precision the
device cannot compute in (bf16 on a CUDA GPU without bfloat16 support, or on MPS before macOS 14).
"""

from __future__ import annotations

import logging

import torch

from swarm.errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "mps")
DEVICE_CHOICES = ("auto", *DEVICES)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and bool(backend.is_available())


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` if a CUDA GPU is there, else ``mps`` if Apple's Metal is, else ``cpu``; an explicit device
    is returned as is when it is available, and is a ConfigError otherwise."""
    if requested == "auto":
        return "cuda" if cuda_available() else "mps" if mps_available() else "cpu"
    if requested == "cuda" and not cuda_available():
        raise ConfigError(
            "device 'cuda' is not available: torch sees no CUDA GPU (a CPU-only torch build, or no driver); "
            "use --device auto or --device cpu"
        )
    if requested == "mps" and not mps_available():
        raise ConfigError(
            "device 'mps' is not available: torch sees no Apple Metal device (not macOS 12.3+ on Apple silicon, "
            "or a torch build without MPS); use --device auto or --device cpu"
        )
    if requested not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICE_CHOICES}, got {requested!r}")
    return requested


def check_precision(device: str, precision: str) -> None:
    """ConfigError unless ``device`` (a resolved one) computes in ``precision`` (``fp32`` or ``bf16``)."""
    if precision != "bf16":
        return
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "precision.compute = 'bf16' needs a CUDA GPU with bfloat16 support (Ampere or newer); this GPU has "
            "none: train this run on other hardware, or use a run with precision.compute = 'fp32'"
        )
    if device == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
        except (RuntimeError, TypeError) as e:
            raise ConfigError(
                f"precision.compute = 'bf16' is not supported on this MPS device (it needs macOS 14+): {e}"
            ) from None
