"""AveragerConfig validation names the field."""

from __future__ import annotations

import pytest

from swarm.averaging import AveragerConfig
from swarm.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_group_size": 0}, "target_group_size"),
        ({"min_group_size": 5, "target_group_size": 4}, "min_group_size"),
        ({"matchmaking_time_s": 0}, "matchmaking_time_s"),
        ({"allreduce_timeout_s": -1.0}, "allreduce_timeout_s"),
        ({"part_size_bytes": 10}, "part_size_bytes"),
        ({"codec": ""}, "codec"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"client_mode": "yes"}, "client_mode"),
        ({"reduction": "median"}, "reduction"),
        ({"clip_tau": -2.0}, "clip_tau"),
        ({"record_ttl_s": 3601.0}, "record_ttl_s"),  # nodes refuse group entries living longer (GROUP_SCHEMA)
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        AveragerConfig(**kwargs)


def test_defaults_are_valid() -> None:
    cfg = AveragerConfig()
    assert cfg.part_size_bytes == 512 * 1024 and cfg.reduction_config().reduction == "mean"
