"""`swarm.configs`: declaring and validating configs, building them from plain data, and every config's docs."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import swarm
from swarm.configs import Config, Limits, build, describe, limits_of, setting
from swarm.errors import ConfigError


class Inner(Config, section="inner"):
    """A nested config."""

    count: int = setting(default=1, ge=0, le=10, doc="An int in [0, 10].")
    costs: tuple[float, ...] = setting(default=(), gt=0, doc="Positive numbers.")


class Outer(Config, section="outer"):
    """A config with one field of each kind the helper checks."""

    name: str = setting(doc="A required string.")
    ratio: float = setting(default=0.5, gt=0, lt=1, doc="A number in (0, 1).")
    flag: bool = setting(default=False, doc="A bool.")
    mode: str = setting(default="a", choices=("a", "b"), doc="a or b.")
    limit: int | None = setting(default=None, ge=1, doc="None or an int >= 1.")
    path: Path | None = setting(default=None, doc="None or a path.")
    pairs: tuple[tuple[str, int], ...] = setting(default=(), doc="(name, count) pairs.")
    inner: Inner = setting(default_factory=Inner, doc="A nested config.")
    low: int = setting(default=0, doc="At most high.")
    high: int = setting(default=0, doc="At least low.")

    def validate(self) -> None:
        if self.low > self.high:
            raise self.invalid("low", f"({self.low}) must be <= high ({self.high})")


def test_defaults_and_frozen_keyword_only() -> None:
    cfg = Outer(name="x")
    assert (cfg.ratio, cfg.inner, cfg.limit) == (0.5, Inner(), None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ratio = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Outer("x")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Outer()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": 3}, "outer.name must be a string, got 3"),
        ({"ratio": "0.5"}, "outer.ratio must be a number, got '0.5'"),
        ({"ratio": True}, "outer.ratio must be a number, got True"),
        ({"ratio": 1}, "outer.ratio must be a number in (0, 1), got 1"),
        ({"ratio": 0.0}, "outer.ratio must be a number in (0, 1), got 0.0"),
        ({"ratio": float("nan")}, "outer.ratio must be a number in (0, 1)"),
        ({"flag": 1}, "outer.flag must be true or false, got 1"),
        ({"mode": "c"}, "outer.mode must be one of ('a', 'b'), got 'c'"),
        ({"limit": 0}, "outer.limit must be None or an int >= 1, got 0"),
        ({"limit": True}, "outer.limit must be None or an int, got True"),
        ({"path": "relative/str"}, "outer.path must be None or a path, got 'relative/str'"),
        ({"pairs": [("a", 1)]}, "outer.pairs must be a tuple"),
        ({"pairs": (("a", "1"),)}, "outer.pairs must be a tuple"),
        ({"inner": {"count": 1}}, "outer.inner must be an Inner"),
        ({"low": 2, "high": 1}, "outer.low (2) must be <= high (1)"),
    ],
)
def test_bad_values_name_section_and_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Outer(**{"name": "x", **kwargs})  # type: ignore[arg-type]
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": True}, "inner.count must be an int, got True"),  # bool is not an int
        ({"count": 1.0}, "inner.count must be an int, got 1.0"),
        ({"count": 11}, "inner.count must be an int in [0, 10], got 11"),
        ({"count": -1}, "inner.count must be an int in [0, 10], got -1"),
        ({"costs": (1.0, 0.0)}, "inner.costs must be a tuple whose items are each > 0, got (1.0, 0.0)"),
        ({"costs": (1.0, False)}, "inner.costs must be a tuple, each item a number"),
    ],
)
def test_ints_bools_and_tuple_items(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Inner(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(message), str(info.value)


class Level(enum.StrEnum):
    LOW = "low"
    HIGH = "high"


def _level(value: object) -> Level:
    if not isinstance(value, str) or value not in Level.__members__.values():
        raise ConfigError(f"unknown level {value!r}")
    return Level(value)


class Converted(Config, section="converted"):
    """A field whose value is converted before it is checked."""

    level: Level = setting(default=Level.LOW, convert=_level, choices=("low", "high"), doc="low or high.")


def test_convert_runs_before_the_checks_and_names_the_field() -> None:
    assert Converted(level="high").level is Level.HIGH  # type: ignore[arg-type]
    assert Converted().level is Level.LOW and build(Converted, {"level": "high"}) == Converted(level=Level.HIGH)
    with pytest.raises(ConfigError, match=r"^converted\.level: unknown level 'mid'$"):
        Converted(level="mid")  # type: ignore[arg-type]
    rows = {name: (default, accepted) for name, default, accepted, _ in describe(Converted)}
    assert rows["level"] == ('"low"', "one of ('low', 'high')")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: _transport(protected_reserve_fraction=0.6), "transport.protected_reserve_fraction must be"),
        (lambda: _transport(max_pending_per_ip=0), "transport.max_pending_per_ip must be an int in [1, 1000000]"),
        (lambda: _transport(connection_log_interval_s=0), "transport.connection_log_interval_s must be"),
        (lambda: _dht(storage_budget_bytes=1024), "dht.storage_budget_bytes must be an int in [65536, "),
        (lambda: _dht(max_share_per_ip=0.0), "dht.max_share_per_ip must be a number in (0, 1]"),
        (lambda: _dht(preferred_key_prefixes=("run/", "")), "dht.preferred_key_prefixes must hold non-empty"),
        (lambda: _dht(max_reply_bytes=1 << 16), "dht.max_reply_bytes (65536) must hold the largest record"),
        (lambda: _storage(budget_bytes=0), "storage.budget_bytes must be an int >= 1"),
        (lambda: _averager(record_ttl_s=3601.0), "averager.record_ttl_s must be a number in (0, 3600.0]"),
        (lambda: _training(record_period_s=61.0), "training.record_period_s must be a number in (0, 60.0]"),
        (lambda: _training(role="validator"), "training.role: role 'validator' is not allowed here"),
        (lambda: _orchestrator(role="auto"), "orchestrator.role: role must be one of"),
    ],
)
def test_merged_fields_are_checked_by_the_helper(factory: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        factory()
    assert str(info.value).startswith(message), str(info.value)


def _transport(**kwargs: object) -> object:
    from swarm.p2p import TransportConfig

    return TransportConfig(**kwargs)  # type: ignore[arg-type]


def _dht(**kwargs: object) -> object:
    from swarm.dht import DHTConfig

    return DHTConfig(**kwargs)  # type: ignore[arg-type]


def _storage(**kwargs: object) -> object:
    from swarm.dht.storage import StorageConfig

    return StorageConfig(**kwargs)  # type: ignore[arg-type]


def _averager(**kwargs: object) -> object:
    from swarm.averaging.config import AveragerConfig

    return AveragerConfig(**kwargs)  # type: ignore[arg-type]


def _training(**kwargs: object) -> object:
    from swarm.run.config import RunConfig
    from swarm.training.training_config import TrainingConfig

    return TrainingConfig(run=RunConfig(), **kwargs)  # type: ignore[arg-type]


def _orchestrator(**kwargs: object) -> object:
    from swarm.verification.orchestrator import OrchestratorConfig

    return OrchestratorConfig(run_id="r", **kwargs)  # type: ignore[arg-type]


def test_accepted_edges() -> None:
    assert Inner(count=0).count == 0 and Inner(count=10).count == 10
    assert Outer(name="x", ratio=1e-9, limit=1).limit == 1
    assert Outer(name="x", pairs=(("lazy", 2),), path=Path("p")).pairs == (("lazy", 2),)
    assert Inner(costs=(1, 2.5)).costs == (1, 2.5)  # an int is a number


def test_build_from_plain_data_recursively() -> None:
    cfg = build(Outer, {"name": "x", "pairs": [["a", 1]], "path": "runs/a", "inner": {"count": 3, "costs": [1.5]}})
    assert cfg == Outer(name="x", pairs=(("a", 1),), path=Path("runs/a"), inner=Inner(count=3, costs=(1.5,)))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\] in \[outer\]; known: flag, high, inner"):
        build(Outer, {"name": "x", "colour": 1})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['z'\] in \[inner\]; known: costs, count"):
        build(Outer, {"name": "x", "inner": {"z": 1}})
    with pytest.raises(ConfigError, match=r"\[inner\] must be a table, got int"):
        build(Outer, {"name": "x", "inner": 3})
    with pytest.raises(ConfigError, match=r"inner\.count must be an int in \[0, 10\], got 99"):
        build(Outer, {"name": "x", "inner": {"count": 99}})


def test_declaring_a_config() -> None:
    with pytest.raises(TypeError, match="section"):

        class NoSection(Config):
            value: int = setting(default=1, doc="A value.")

    with pytest.raises(TypeError, match="validate"):

        class OwnPostInit(Config, section="own"):
            def __post_init__(self) -> None:
                pass

    with pytest.raises(TypeError, match="one non-empty line"):
        setting(default=1, doc="")
    with pytest.raises(TypeError, match="one non-empty line"):
        setting(default=1, doc="two\nlines")
    with pytest.raises(TypeError, match="not both"):
        setting(default=1, ge=0, limits=Limits(le=3), doc="Both.")
    assert limits_of(Inner, "count") == Limits(ge=0, le=10)
    rows = {name: (default, accepted, doc) for name, default, accepted, doc in describe(Outer)}
    assert rows["inner.count"] == ("1", "an int in [0, 10]", "An int in [0, 10].")
    assert rows["ratio"] == ("0.5", "a number in (0, 1)", "A number in (0, 1).")
    assert rows["name"][0] == "(required)" and rows["mode"][:2] == ('"a"', "one of ('a', 'b')")
    assert rows["limit"][1] == "None or an int >= 1" and rows["inner.costs"][:2] == (
        "[]",
        "a tuple, each item a number > 0",
    )


# ---- every config of the package ---------------------------------------------------------------------------------


def _package_configs() -> list[type[Config]]:
    for module in pkgutil.walk_packages(swarm.__path__, "swarm."):
        importlib.import_module(module.name)
    found: list[type[Config]] = []
    todo = list(Config.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("swarm."):
            found.append(cls)
    return found


def test_every_config_field_has_a_one_line_doc() -> None:
    configs = _package_configs()
    names = {cls.__name__ for cls in configs}
    assert {"RunConfig", "OptimizerConfig", "TransportConfig", "DHTConfig", "AveragerConfig", "TrainingConfig"} <= names
    assert {
        "StorageConfig",
        "LookupParams",
        "MisbehaveConfig",
        "NodeConfig",
        "LaunchConfig",
        "ExportConfig",
        "OrchestratorConfig",
        "FloodConfig",
    } <= names
    assert len(configs) >= 38
    missing = [
        f"{cls.__module__}.{cls.__name__}.{f.name}"
        for cls in configs
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if not str(f.metadata.get("doc", "")).strip() or "\n" in str(f.metadata.get("doc", ""))
    ]
    assert not missing, f"fields without a one-line doc (declare them with swarm.configs.setting): {missing}"
    sections = [cls for cls in configs if not cls.section or not cls.section.isidentifier()]
    assert not sections, f"configs without a section name: {sections}"


def test_every_config_dataclass_uses_the_shared_helper() -> None:
    """A config declared as a plain dataclass would skip the shared validation and the docs."""
    _package_configs()
    plain = [
        f"{name}.{obj.__name__}"
        for name, module in list(sys.modules.items())
        if name.startswith("swarm.")
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and obj.__module__ == name
        and dataclasses.is_dataclass(obj)
        and obj.__name__.endswith(("Config", "Settings", "Params", "Policy", "Options"))
        and not issubclass(obj, Config)
    ]
    assert not plain, f"config dataclasses not declared with swarm.configs.Config: {plain}"


def test_every_default_is_valid() -> None:
    for cls in _package_configs():
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING for f in fields):
            cls()  # raises ConfigError if a default is out of its own range


def test_run_config_blocksizes_match_the_codec() -> None:
    from swarm.compression.blockwise8 import VALID_BLOCKSIZES
    from swarm.run.config import BLOCKWISE8_BLOCKSIZES

    assert BLOCKWISE8_BLOCKSIZES == VALID_BLOCKSIZES


def test_the_docs_list_every_run_config_field() -> None:
    from swarm.run.config import RunConfig

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [name for name, *_ in describe(RunConfig) if f"| `{name}` |" not in text]
    assert not missing, (
        f"docs/training.md lacks these run-config fields (regenerate with describe(RunConfig)): {missing}"
    )
