"""One way to declare and validate a config: a frozen, keyword-only dataclass whose fields carry a doc and a range.

Declare a config by subclassing `Config` with its section name, and every field with `setting`::

    class OptimizerConfig(Config, section="optimizer"):
        '''The optimizer every stage applies after averaging.'''

        name: str = setting(default="adamw", choices=("adamw", "sgd"), doc="The optimizer.")
        lr: float = setting(default=3e-3, ge=0.0, le=10.0, doc="Peak learning rate.")

        def validate(self) -> None:  # optional: the rules that involve more than one field
            ...

The subclass is made a frozen, keyword-only dataclass. On construction every field is checked against its
annotation (``int`` excludes ``bool``; ``float`` takes an int or a float, not a bool; ``X | None``; ``tuple[...]``;
``Path``; nested configs) and against its range or choices; then `Config.validate` runs. Every failure is a
`ConfigError` whose message names the field as ``section.field``. A field declared with ``convert=`` first turns
the given value into its type (``setting(default=Role.AUTO, convert=Role.parse, ...)`` takes ``"auto"`` too).

`build` makes a config from plain data (parsed TOML, say), recursively for nested configs, and rejects unknown
keys. `apply_overrides` applies ``dotted.path=VALUE`` overrides (``--set`` on the command line) to such data.
This module imports only the standard library and `swarm.errors`, so every layer may use it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, dataclass_transform, overload

from swarm.errors import ConfigError

T = TypeVar("T")
C = TypeVar("C", bound="Config")

_MISSING: Any = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Limits:
    """The accepted values of one field besides its type: bounds (``ge``, ``gt``, ``le``, ``lt``) and ``choices``.

    For a tuple field they apply to every item.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None

    def accepts(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        return not (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def describe(self) -> str:
        """``in [0, 10]``, ``>= 1``, ``one of ('a', 'b')``; empty when there is no limit."""
        if self.choices is not None:
            return f"one of {self.choices}"
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low is not None and high is not None:
            return f"in {low}, {high}"
        if low is not None:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high is not None:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return ""


@overload
def setting(
    *,
    default: T,
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
    limits: Limits | None = None,
    convert: Callable[[Any], Any] | None = None,
) -> T: ...


@overload
def setting(
    *,
    default_factory: Callable[[], T],
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
    limits: Limits | None = None,
    convert: Callable[[Any], Any] | None = None,
) -> T: ...


@overload
def setting(
    *,
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
    limits: Limits | None = None,
    convert: Callable[[Any], Any] | None = None,
) -> Any: ...


def setting(
    *,
    default: Any = _MISSING,
    default_factory: Any = _MISSING,
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
    limits: Limits | None = None,
    convert: Callable[[Any], Any] | None = None,
) -> Any:
    """A config field: its default (or ``default_factory``; neither: required), a one-line ``doc``, and its limits:
    ``ge``/``gt``/``le``/``lt``/``choices``, or ``limits`` (`limits_of` another config's field) to share a range.
    ``convert`` turns a given value into the field's type before it is checked (``Role.parse`` turns ``"auto"``
    into ``Role.AUTO``); a ConfigError it raises is reported under the field's name.

    ``default`` is keyword-only so that type checkers see it (``dataclass_transform`` field specifiers).
    """
    if not doc.strip() or "\n" in doc:
        raise TypeError(f"a setting's doc is one non-empty line, got {doc!r}")
    own = Limits(ge=ge, gt=gt, le=le, lt=lt, choices=tuple(choices) if choices is not None else None)
    if limits is not None and own != Limits():
        raise TypeError("give either limits or ge/gt/le/lt/choices, not both")
    limits = limits if limits is not None else own
    metadata = {"doc": doc, "limits": limits, "convert": convert}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def limits_of(cls: type[Config], name: str) -> Limits:
    """The limits of ``cls``'s field ``name``: ``setting(limits=limits_of(...))`` declares the same range."""
    limits: Limits = _field(cls, name).metadata.get("limits", Limits())
    return limits


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(setting, dataclasses.field))
class Config:
    """Base of every config: subclasses become frozen, keyword-only dataclasses, validated on construction.

    ``class X(Config, section="name")``: ``name`` prefixes the field names in error messages (``name.field``).
    """

    section: ClassVar[str] = ""

    def __init_subclass__(cls, *, section: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if section:
            cls.section = section
        if not cls.section:
            raise TypeError(f"{cls.__name__}: declare the section, e.g. class {cls.__name__}(Config, section='name')")
        if "__post_init__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: put cross-field rules in validate(); __post_init__ runs the field checks")
        dataclasses.dataclass(frozen=True, kw_only=True)(cls)

    def __post_init__(self) -> None:
        for check in _checks(type(self)):
            check(self)
        self.validate()

    def validate(self) -> None:
        """Rules that involve more than one field (override; raise `Config.invalid`)."""

    @classmethod
    def invalid(cls, name: str, text: str) -> ConfigError:
        """The error for field ``name``: ``section.name <text>``."""
        return ConfigError(f"{cls.section}.{name} {text}")


# ---- checking one field ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What an annotation accepts, and how to say it."""

    name: str
    accepts: Callable[[Any], bool]
    items: _Kind | None = None  # for tuple[X, ...]: the kind of every item (limits apply to the items)


def _kind(tp: Any) -> _Kind:
    if tp is Any or tp is object:
        return _Kind("anything", lambda v: True)
    if tp is bool:
        return _Kind("true or false", lambda v: isinstance(v, bool))
    if tp is int:
        return _Kind("an int", lambda v: isinstance(v, int) and not isinstance(v, bool))
    if tp is float:
        return _Kind("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool))
    if tp is str:
        return _Kind("a string", lambda v: isinstance(v, str))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        options = [_kind(a) for a in args if a is not type(None)]
        nullable = type(None) in args
        names = (["None"] if nullable else []) + [k.name for k in options]
        inner = options[0].items if len(options) == 1 else None
        return _Kind(
            " or ".join(names),
            lambda v: (nullable and v is None) or any(k.accepts(v) for k in options),
            inner,
        )
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _kind(args[0])
            return _Kind(
                f"a tuple, each item {item.name}", lambda v: isinstance(v, tuple) and all(map(item.accepts, v)), item
            )
        kinds = [_kind(a) for a in args]
        return _Kind(
            f"a tuple ({', '.join(k.name for k in kinds)})",
            lambda v: (
                isinstance(v, tuple)
                and len(v) == len(kinds)
                and all(k.accepts(x) for k, x in zip(kinds, v, strict=True))
            ),
        )
    if origin is not None and isinstance(origin, type) and issubclass(origin, Callable):  # type: ignore[arg-type]
        return _Kind("a callable", callable)
    if isinstance(tp, type):
        if getattr(tp, "_is_protocol", False) and not getattr(tp, "_is_runtime_protocol", False):
            return _Kind(tp.__name__, lambda v: True)  # a static Protocol: the config's validate() checks it
        name = "a path" if issubclass(tp, Path) else f"{'an' if tp.__name__[0] in 'AEIOU' else 'a'} {tp.__name__}"
        return _Kind(name, lambda v: isinstance(v, tp))
    raise TypeError(f"swarm.configs cannot check fields annotated {tp!r}")


def _field_check(cls: type[Config], field: dataclasses.Field[Any], tp: Any) -> Callable[[Config], None]:
    kind = _kind(tp)
    limits: Limits = field.metadata.get("limits", Limits())
    limited = limits != Limits()
    convert: Callable[[Any], Any] | None = field.metadata.get("convert")
    where = f"{cls.section}.{field.name}"
    name = field.name

    def check(config: Config) -> None:
        value = getattr(config, name)
        if convert is not None:
            try:
                value = convert(value)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            object.__setattr__(config, name, value)
        if not kind.accepts(value):
            raise ConfigError(f"{where} must be {kind.name}, got {value!r}")
        if not limited or value is None:
            return
        if kind.items is not None:
            if not all(limits.accepts(item) for item in value):
                raise ConfigError(f"{where} must be a tuple whose items are each {limits.describe()}, got {value!r}")
        elif not limits.accepts(value):
            raise ConfigError(f"{where} must be {_wanted(kind, limits)}, got {value!r}")

    return check


def _wanted(kind: _Kind, limits: Limits) -> str:
    if limits.choices is None:
        return f"{kind.name} {limits.describe()}"
    return ("None or " if kind.accepts(None) else "") + limits.describe()


_HINTS: dict[type, dict[str, Any]] = {}
_CHECKS: dict[type, tuple[Callable[[Config], None], ...]] = {}


def _hints(cls: type[Config]) -> dict[str, Any]:
    """The resolved annotations of ``cls`` (cached per class)."""
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = _HINTS[cls] = typing.get_type_hints(cls)
        except NameError as e:
            raise TypeError(f"{cls.__name__}: an annotation names something not importable at run time: {e}") from None
    return hints


def _checks(cls: type[Config]) -> tuple[Callable[[Config], None], ...]:
    """One check per field of ``cls`` (built once per class)."""
    checks = _CHECKS.get(cls)
    if checks is None:
        hints = _hints(cls)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        checks = _CHECKS[cls] = tuple(_field_check(cls, f, hints[f.name]) for f in fields)
    return checks


def _field(cls: type[Config], name: str) -> dataclasses.Field[Any]:
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _config_type(tp: Any) -> type[Config] | None:
    """The config class ``tp`` names (also through ``X | None``), else None."""
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        found = [t for t in typing.get_args(tp) if isinstance(t, type) and issubclass(t, Config)]
        return found[0] if len(found) == 1 else None
    return None


# ---- building from plain data ----------------------------------------------------------------------------------


def field_names(cls: type[Config]) -> tuple[str, ...]:
    """The names of ``cls``'s fields, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def build(cls: type[C], data: Mapping[str, Any], section: str | None = None) -> C:
    """``cls`` from plain data (a parsed TOML table): nested configs from sub-tables, lists as tuples, strings as
    paths where the field is a Path. Unknown keys are a ConfigError that lists the known ones."""
    where = section or cls.section
    if not isinstance(data, Mapping):
        raise ConfigError(f"[{where}] must be a table, got {type(data).__name__}")
    known = field_names(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; known: {', '.join(sorted(known))}")
    hints = _hints(cls)
    kwargs = {key: _from_data(hints[key], value, key) for key, value in data.items()}
    return cls(**kwargs)


def _from_data(tp: Any, value: Any, key: str) -> Any:
    nested = _config_type(tp)
    if nested is not None and value is not None:
        return build(nested, value, key)
    if isinstance(value, list) and typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        item_tp = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return tuple(_from_data(item_tp, item, key) for item in value)
    if isinstance(value, str) and _accepts_path(tp):
        return Path(value)
    return value


def _accepts_path(tp: Any) -> bool:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return any(_accepts_path(t) for t in typing.get_args(tp))
    return isinstance(tp, type) and issubclass(tp, Path)


# ---- overrides and flat views ----------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A command-line value read as a TOML value (``1e-3``, ``true``, ``"text"``, ``[1, 2]``); else the bare string."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["value"] if set(parsed) == {"value"} else text


def apply_overrides(
    data: Mapping[str, Any], overrides: Iterable[str], schema: type[Config] | None = None
) -> dict[str, Any]:
    """A copy of ``data`` with each ``dotted.path=VALUE`` set (VALUE by `parse_value`).

    With ``schema``, every path must name a field of it (through nested configs); an unknown path is a
    ConfigError naming it. Apply overrides to the parsed data before `build`, so they count as edits of the file.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides:
        path, sep, text = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise ConfigError(f"override {item!r}: write FIELD=VALUE, e.g. optimizer.lr=1e-3")
        keys = path.split(".")
        if schema is not None:
            _check_path(schema, keys)
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {path!r}: {'.'.join(keys[: depth + 1])} is not a table")
            node = child
        node[keys[-1]] = parse_value(text)
    return out


def _check_path(schema: type[Config], keys: list[str]) -> None:
    cls: type[Config] | None = schema
    for depth, key in enumerate(keys):
        path = ".".join(keys[: depth + 1])
        if cls is None:
            raise ConfigError(f"override {'.'.join(keys)!r}: {'.'.join(keys[:depth])} is a value, not a section")
        known = field_names(cls)
        if key not in known:
            raise ConfigError(f"override {'.'.join(keys)!r}: no field {path!r}; known here: {', '.join(known)}")
        cls = _config_type(_hints(cls)[key])


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """The canonical form of config data (sorted-key compact JSON, UTF-8): equal data, equal bytes; TypeError if
    ``data`` is not JSON data. Run ids and model-config hashes are SHA-256s of it."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def describe(cls: type[Config], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted name, default, accepted values, doc)`` of every field of ``cls``, nested configs expanded; the
    default as JSON (as TOML writes most values) where it can be."""
    rows: list[tuple[str, str, str, str]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        nested = _config_type(hints[f.name])
        factory: Any = f.default_factory
        if nested is not None and factory is nested:
            rows += describe(nested, f"{prefix}{f.name}.")
            continue
        if f.default is not _MISSING or factory is not _MISSING:
            value = f.default if f.default is not _MISSING else factory()
            try:
                default = json.dumps(str(value) if isinstance(value, Path) else value)
            except TypeError:
                default = repr(value)
        else:
            default = "(required)"
        kind, limits = _kind(hints[f.name]), f.metadata.get("limits", Limits())
        accepted = _wanted(kind, limits).strip() if kind.items is None else f"{kind.name} {limits.describe()}".strip()
        rows.append((f"{prefix}{f.name}", default, accepted, str(f.metadata.get("doc", ""))))
    return rows
