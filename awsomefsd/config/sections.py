"""Declared settings, read and checked: the small part of pydantic that `config.py` used.

A section is a class whose annotated attributes are its settings, each with a default, bounds and
a description (`Field`). `model_validate` reads a nested dict (the TOML file, the `AWSOMEFS_*`
variables and the flags, merged) into sections, converting what the environment gives as text
("60", "true", "8G") to each setting's type, and reports every wrong setting at once, each by
its place (`section.key`), what is wrong and what was given (`SettingsError.errors`).

Why not pydantic, which this replaces: importing it and building its validators for our dozen
sections was a third of the instructions a starting daemon runs before it serves (valgrind), and
applications wait that long at every restart of the daemon (issue 41 item 5). What the settings
need is a few scalar types, literals, lists, optional values and nested sections.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_MISSING: Any = object()


@dataclass(frozen=True)
class BeforeValidator:
    """Annotated[T, BeforeValidator(f)]: f reads the raw value first (ValueError: wrong)."""

    func: Callable[[Any], Any]


@dataclass(frozen=True)
class AfterValidator:
    """Annotated[T, AfterValidator(f)]: f checks the value once it is a T (ValueError: wrong)."""

    func: Callable[[Any], Any]


@dataclass
class FieldInfo:
    """One setting: its default (or factory), bounds, description, and its type once resolved."""

    default: Any = _MISSING
    default_factory: Callable[[], Any] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    description: str = ""
    annotation: Any = None

    def make_default(self) -> Any:
        if self.default_factory is not None:
            return self.default_factory()
        return copy.deepcopy(self.default)  # a section given as default is each instance's own


def Field(default: Any = _MISSING, *, default_factory: Callable[[], Any] | None = None,
          ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
          description: str = "") -> Any:
    """A setting's default, bounds and description (typed Any, so that `x: int = Field(3)` checks)."""
    return FieldInfo(default, default_factory, ge, gt, le, lt, description)


@dataclass
class _Errors:
    found: list[dict[str, Any]] = field(default_factory=list)

    def add(self, loc: tuple[str | int, ...], msg: str, given: Any) -> None:
        self.found.append({"loc": loc, "msg": msg, "input": given})


class SettingsError(ValueError):
    """Settings that do not read: every error, each {"loc", "msg", "input"} as pydantic gave them."""

    def __init__(self, found: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in found))
        self._found = found

    def errors(self) -> list[dict[str, Any]]:
        return list(self._found)


class Section:
    """A group of settings; a key it does not know is an error (a misspelt `[tier] endpont` would
    otherwise leave tiering off without a word). Subclasses declare settings as annotated class
    attributes."""

    model_fields: ClassVar[dict[str, FieldInfo]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hints = typing.get_type_hints(cls, include_extras=True)
        fields: dict[str, FieldInfo] = {}
        for name, annotation in hints.items():
            if get_origin(annotation) is ClassVar or name.startswith("_"):
                continue
            declared = cls.__dict__.get(name, _MISSING)
            info = declared if isinstance(declared, FieldInfo) else FieldInfo(default=declared)
            info.annotation = annotation
            fields[name] = info
            if isinstance(declared, FieldInfo):
                delattr(cls, name)  # instances carry the value
        cls.model_fields = fields

    def __init__(self, **values: Any) -> None:
        errors = _Errors()
        self._read(values, (), errors)
        if errors.found:
            raise SettingsError(errors.found)

    @classmethod
    def model_validate(cls, data: Any) -> typing.Self:
        errors = _Errors()
        made = _read_section(cls, data, (), errors)
        if errors.found:
            raise SettingsError(errors.found)
        return made

    def _read(self, values: dict[str, Any], loc: tuple[str | int, ...], errors: _Errors) -> None:
        for name in values:
            if name not in self.model_fields:
                errors.add((*loc, name), "Extra inputs are not permitted", values[name])
        for name, info in self.model_fields.items():
            if name in values:
                value = _read_value(info.annotation, info, values[name], (*loc, name), errors)
            elif info.default is _MISSING and info.default_factory is None:
                errors.add((*loc, name), "Field required", values)
                continue
            else:
                value = info.make_default()
            object.__setattr__(self, name, value)
        self.model_post_init()

    def model_post_init(self) -> None:
        """What a section completes once read (the node's name, say); nothing by default."""

    def model_copy(self, *, update: dict[str, Any] | None = None) -> typing.Self:
        """A copy with `update` over it, unchecked (as pydantic's)."""
        made = copy.copy(self)
        for name, value in (update or {}).items():
            object.__setattr__(made, name, value)
        return made

    def model_dump(self) -> dict[str, Any]:
        return {name: _dump(getattr(self, name)) for name in self.model_fields}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.model_dump() == other.model_dump()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, as pydantic's models

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.model_fields)
        return f"{type(self).__name__}({shown})"


def _dump(value: Any) -> Any:
    if isinstance(value, Section):
        return value.model_dump()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _read_section(cls: type[Section], data: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        errors.add(loc, f"Input should be a valid dictionary or instance of {cls.__name__}", data)
        return None
    made = cls.__new__(cls)
    made._read(data, loc, errors)
    return made


def _read_value(annotation: Any, info: FieldInfo | None, value: Any, loc: tuple[str | int, ...],
                errors: _Errors) -> Any:
    """`value` as `annotation` says, bounds checked; errors noted at `loc` (the value is then None)."""
    try:
        return _convert(annotation, info, value, loc, errors)
    except ValueError as exc:
        errors.add(loc, str(exc), value)
        return None


def _convert(annotation: Any, info: FieldInfo | None, value: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *marks = get_args(annotation)
        for mark in marks:
            if isinstance(mark, BeforeValidator):
                value = _checked(mark.func, value)
        value = _convert(base, info, value, loc, errors)
        for mark in marks:
            if isinstance(mark, AfterValidator):
                value = _checked(mark.func, value)
        return value
    if origin in (typing.Union, _UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        (only,) = [option for option in options if option is not type(None)]
        return _convert(only, info, value, loc, errors)
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ValueError("Input should be " + _either(repr(c) for c in choices))
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError("Input should be a valid list")
        (item,) = get_args(annotation)
        return [_read_value(item, None, v, (*loc, i), errors) for i, v in enumerate(value)]
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return _read_section(annotation, value, loc, errors)
    converted = _SCALARS[annotation](value)
    if info is not None:
        _bounds(info, converted)
    return converted


def _checked(func: Callable[[Any], Any], value: Any) -> Any:
    try:
        return func(value)
    except ValueError as exc:
        raise ValueError(f"Value error, {exc}") from None


def _either(choices: Iterable[str]) -> str:
    shown = list(choices)
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + f" or {shown[-1]}"


def _bounds(info: FieldInfo, value: Any) -> None:
    for bound, holds, says in ((info.ge, lambda b: value >= b, "greater than or equal to"),
                               (info.gt, lambda b: value > b, "greater than"),
                               (info.le, lambda b: value <= b, "less than or equal to"),
                               (info.lt, lambda b: value < b, "less than")):
        if bound is not None and not holds(bound):
            raise ValueError(f"Input should be {says} {bound}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
        return value.strip().lower() in TRUE
    raise ValueError("Input should be a valid boolean")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("Input should be a valid integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("Input should be a valid integer, got a number with a fractional part")
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError("Input should be a valid integer")


def _to_float(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError("Input should be a valid number")


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("Input should be a valid string")


def _to_path(value: Any) -> Path:
    if isinstance(value, str | Path):
        return Path(value)
    raise ValueError("Input should be a valid path")


_UnionType = type(int | None)
_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str,
                                             Path: _to_path}
