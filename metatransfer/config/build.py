"""The generic builder: a frozen dataclass from a parsed mapping, checked against its type hints.

Unknown keys, missing keys and wrong types are errors naming the key path,
what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from metatransfer.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def finite_float(value: int | float, where: str) -> float:
    """`value` as a float, refusing inf, nan and integers beyond float range.

    YAML reads `.inf` and `.nan` as floats; no setting means anything by them,
    and a range check such as `lr > 0` lets inf through.

    Args:
        value: a number (bools are refused by the caller).
        where: the key path, for the message.

    Raises:
        ConfigError: naming the key and the value found.
    """
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ConfigError(f"{where}: expected a finite number, found {value!r}")
    return out


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp` and convert containers; raise ConfigError naming `where`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {' / '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {type(value).__name__} ({value!r})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, found {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {type(value).__name__} ({value!r})")
        return {
            _convert(k, key_tp, where): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, found {type(value).__name__} ({value!r})")
        return finite_float(value, where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, found {type(value).__name__} ({value!r})")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, found {type(value).__name__} ({value!r})")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # a bug in this module, not the user's


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(raw).__name__} ({raw!r})")
    hints = get_type_hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(flds))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys: {sorted(flds)}"
        )
    kwargs = {}
    for name, f in flds.items():
        path = f"{where}.{name}" if where else name
        if name not in raw:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
            if has_default:
                continue
            raise ConfigError(f"{path}: missing required key (expected {_type_name(hints[name])})")
        kwargs[name] = _convert(raw[name], hints[name], path)
    return cls(**kwargs)
