"""Which codec serves which role: activations, activation gradients, the all-reduce, state transfer."""

from __future__ import annotations

import enum
import logging
from typing import Any

import torch

from swarm.compression.base import FLOAT_DTYPES, Codec, codec_names, get_codec
from swarm.compression.blockwise8 import VALID_BLOCKSIZES
from swarm.configs import Config, build, setting
from swarm.errors import ConfigError

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    """What a tensor on the wire is for."""

    ACTIVATIONS = "activations"
    ACTIVATION_GRADS = "activation_grads"
    ALLREDUCE = "allreduce"
    STATE = "state"


class CodecPolicy(Config, section="codecs"):
    """Codec names per role (from the run config) and the size under which tensors go uncompressed.

    Non-floating tensors and tensors with fewer than ``min_compress_numel`` elements always use ``none``.
    ``topk_fraction`` and ``blockwise8_blocksize`` configure those codecs wherever a role names them.
    """

    activations: str = setting(default="fp16", doc="Codec of the activations sent forward.")
    activation_grads: str = setting(default="fp16", doc="Codec of the activation gradients sent backward.")
    allreduce: str = setting(default="blockwise8", doc="Codec of the gradient parts in the all-reduce.")
    state: str = setting(default="none", doc="Codec of stage states downloaded by joining peers.")
    min_compress_numel: int = setting(default=65536, ge=0, doc="Tensors with fewer elements go uncompressed.")
    topk_fraction: float = setting(default=0.01, gt=0, le=1, doc="topk: the share of values kept.")
    blockwise8_blocksize: int = setting(
        default=4096, choices=VALID_BLOCKSIZES, doc="blockwise8: values per quantization block."
    )

    def validate(self) -> None:
        known = codec_names()
        for role in Role:
            name = getattr(self, role.value)
            if name not in known:
                raise self.invalid(role.value, f"must be one of {', '.join(known)}: unknown codec {name!r}")
        for role in (Role.ACTIVATIONS, Role.ACTIVATION_GRADS, Role.STATE):
            if getattr(self, role.value) == "topk":
                raise self.invalid(
                    role.value,
                    "must not be topk: topk is for gradients in the all-reduce (with error feedback); "
                    "it would silently drop most of an activation or a state tensor",
                )

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
        """Build from a run-config table (e.g. ``[codecs]`` in TOML); unknown keys are an error."""
        return build(cls, values)
