"""Typed wire messages: bytes from peers become checked dataclasses at the edge.

Every RPC request and reply is a frozen, keyword-only dataclass deriving from :class:`Message`.
On the wire it is a msgpack map of its fields (never pickle). :meth:`Message.from_wire` checks the
decoded object against the field annotations and raises :class:`ProtocolError` on any mismatch, so
handlers only ever see well-typed values. Range checks go in ``__post_init__`` (raise ``ValueError``);
they are turned into ``ProtocolError`` too.

Supported annotations: ``int``, ``float`` (ints accepted), ``str``, ``bytes``, ``bool``, ``None``, a
``StrEnum`` (travels as its string), ``X | None``, ``list[T]``, ``tuple[T, ...]``, ``dict[K, V]``, nested
``Message`` subclasses, ``Any``.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

import msgpack

from swarm.errors import ProtocolError

M = TypeVar("M", bound="Message")

DEFAULT_MAX_MESSAGE_SIZE_BYTES = 64 * 1024 * 1024


def packb(obj: Any) -> bytes:
    """msgpack-encode plain data (bytes stay binary, str stays str)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes | bytearray | memoryview, *, max_size_bytes: int = DEFAULT_MAX_MESSAGE_SIZE_BYTES) -> Any:
    """msgpack-decode untrusted bytes with size limits; ProtocolError on anything malformed."""
    if len(data) > max_size_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_size_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as e:
        raise ProtocolError(f"malformed msgpack ({type(e).__name__}: {e})") from None


class Message:
    """Base of typed wire messages. Subclasses are ``@dataclass(frozen=True, kw_only=True)``."""

    _hints_cache: ClassVar[dict[type, dict[str, Any]]] = {}
    # Declared for the type checker only (every subclass is a dataclass, which sets it): makes a Message a
    # dataclass instance for dataclasses.fields / replace.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_wire(self) -> dict[str, Any]:
        return {f.name: _to_wire(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def pack(self) -> bytes:
        return packb(self.to_wire())

    @classmethod
    def unpack(
        cls: type[M], data: bytes | bytearray | memoryview, *, max_size_bytes: int = DEFAULT_MAX_MESSAGE_SIZE_BYTES
    ) -> M:
        return cls.from_wire(unpackb(data, max_size_bytes=max_size_bytes))

    @classmethod
    def from_wire(cls: type[M], obj: Any) -> M:
        """Build and check a message from decoded msgpack; ProtocolError if it does not fit."""
        if not isinstance(obj, dict):
            raise ProtocolError(f"{cls.__name__}: expected a map, got {type(obj).__name__}")
        hints = cls._hints()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(obj) - set(fields)
        if unknown:
            raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(map(str, unknown))}")
        kwargs: dict[str, Any] = {}
        for name, field in fields.items():
            if name not in obj:
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                    raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
                continue
            kwargs[name] = _check(obj[name], hints[name], f"{cls.__name__}.{name}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise ProtocolError(f"{cls.__name__}: {e}") from None

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        hints = Message._hints_cache.get(cls)
        if hints is None:
            hints = get_type_hints(cls)
            Message._hints_cache[cls] = hints
        return hints


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _check(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against ``hint``; return it converted (lists to tuples, maps to messages)."""
    if hint is Any:
        return value
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _check(value, option, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {type(value).__name__} does not match {hint}")
    if hint is None or hint is type(None):
        if value is not None:
            raise ProtocolError(f"{where}: expected nil, got {type(value).__name__}")
        return None
    if isinstance(hint, type) and issubclass(hint, Message):
        return hint.from_wire(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where}: expected an array, got {type(value).__name__}")
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ProtocolError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
        item = args[0] if args else Any
        checked = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        key_hint, value_hint = get_args(hint) or (Any, Any)
        return {_check(k, key_hint, f"{where} key"): _check(v, value_hint, f"{where}[{k!r}]") for k, v in value.items()}
    return _check_scalar(value, hint, where)


def _check_scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected float, got {type(value).__name__}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected str, got {type(value).__name__}")
        return value
    if hint is bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise ProtocolError(f"{where}: expected bytes, got {type(value).__name__}")
        return bytes(value)
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        choices = [member.value for member in hint]
        if not isinstance(value, str) or value not in choices:
            raise ProtocolError(f"{where}: expected one of {choices}, got {value!r}")
        return hint(value)
    raise TypeError(f"{where}: unsupported annotation {hint!r} in a Message")
