"""Which codec serves which role: activations, activation gradients, the all-reduce, state transfer."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

import torch

from swarm.compression.base import FLOAT_DTYPES, Codec, codec_names, get_codec
from swarm.errors import ConfigError, SwarmError

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    """What a tensor on the wire is for."""

    ACTIVATIONS = "activations"
    ACTIVATION_GRADS = "activation_grads"
    ALLREDUCE = "allreduce"
    STATE = "state"


@dataclass(frozen=True, kw_only=True)
class CodecPolicy:
    """Codec names per role (from the run config) and the size under which tensors go uncompressed.

    Non-floating tensors and tensors with fewer than ``min_compress_numel`` elements always use ``none``.
    ``topk_fraction`` and ``blockwise8_blocksize`` configure those codecs wherever a role names them.
    """

    activations: str = "fp16"
    activation_grads: str = "fp16"
    allreduce: str = "blockwise8"
    state: str = "none"
    min_compress_numel: int = 65536
    topk_fraction: float = 0.01
    blockwise8_blocksize: int = 4096

    def __post_init__(self) -> None:
        known = codec_names()
        for role in Role:
            name = getattr(self, role.value)
            if name not in known:
                raise ConfigError(f"CodecPolicy.{role.value}: unknown codec {name!r}; use one of {', '.join(known)}")
        if not (isinstance(self.min_compress_numel, int) and self.min_compress_numel >= 0):
            raise ConfigError(f"CodecPolicy.min_compress_numel must be an int >= 0, got {self.min_compress_numel!r}")
        for role in (Role.ACTIVATIONS, Role.ACTIVATION_GRADS, Role.STATE):
            if getattr(self, role.value) == "topk":
                raise ConfigError(
                    f"CodecPolicy.{role.value}: topk is for gradients in the all-reduce (with error feedback); "
                    "it would silently drop most of an activation or a state tensor"
                )
        for field_name in ("topk_fraction", "blockwise8_blocksize"):
            try:
                self._make("topk" if field_name == "topk_fraction" else "blockwise8")
            except (SwarmError, TypeError) as e:
                raise ConfigError(f"CodecPolicy.{field_name}: {e}") from None

    def _make(self, name: str) -> Codec:
        kwargs: dict[str, Any] = {}
        if name == "topk":
            kwargs["fraction"] = self.topk_fraction
        elif name == "blockwise8":
            kwargs["blocksize"] = self.blockwise8_blocksize
        return get_codec(name, **kwargs)

    def codec_name_for(self, role: Role | str, tensor: torch.Tensor) -> str:
        """The codec name this policy picks for ``tensor`` in ``role``."""
        try:
            role = Role(role)
        except ValueError:
            raise ConfigError(f"unknown role {role!r}; use one of {[r.value for r in Role]}") from None
        if tensor.dtype not in FLOAT_DTYPES or tensor.numel() < self.min_compress_numel:
            return "none"
        return str(getattr(self, role.value))

    def codec_for(self, role: Role | str, tensor: torch.Tensor) -> Codec:
        """The codec this policy picks for ``tensor`` in ``role``."""
        return self._make(self.codec_name_for(role, tensor))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CodecPolicy:
        """Build from a run-config table (e.g. ``[compression]`` in TOML); unknown keys are an error."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"CodecPolicy: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)
