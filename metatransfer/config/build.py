"""The base of every config model, its field types, and the one translator of pydantic's errors.

Every params.yaml section (and each algorithm's hyper-parameters, and the
promotion gate's settings) is a frozen pydantic model that refuses unknown
keys (`ConfigModel`). Scalars are strict (`Int`, `Float`, `Str`, `Bool`: no
"1" for 1, no true for 1, no inf or nan for a float); ranges are `Field`
bounds (`bounded`) and choices `Literal`s. A failed validation becomes ONE
error of the project's own type, worded as before pydantic: the key path,
what was expected and what was found (`config_error`); pydantic's text never
reaches the user.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, ValidationError
from pydantic.fields import FieldInfo

from metatransfer.errors import ConfigError

Int = Annotated[int, Strict()]
"""An integer; bools and floats are refused."""
Float = Annotated[float, Strict(), AllowInfNan(False)]
"""A finite number; an integer is taken as a float, bools, strings, inf and nan are refused."""
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]


def bounded(default: Any = ..., *, hint: str = "", **bounds: float) -> Any:
    """A field with bounds (`ge`, `gt`, `le`, `lt`); `hint` follows the rule in the error message.

    Without a default (`...`) the key is required.

    Example: `steps: Int = bounded(ge=0, hint="0: only at the end")` refuses -1 with
    "<key>: must be >= 0 (0: only at the end), found -1".
    """
    return Field(default, json_schema_extra={"hint": hint} if hint else None, **bounds)  # type: ignore[arg-type]


class ConfigModel(BaseModel):
    """A frozen config model: unknown keys are refused, fields may be given by position too.

    Constructing one with bad values raises `error_type` (ConfigError) worded by
    `config_error`, under the key path `error_where` (a class may set both).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    error_where: ClassVar[str] = ""
    error_type: ClassVar[type[Exception]] = ConfigError
    # Keys renamed since older params files (old -> new): an unknown-key error names the new one.
    renamed_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, *args: Any, **data: Any) -> None:
        # Positional fields, in declaration order, as the dataclasses these models replace took them.
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional fields, got {len(args)}")
        twice = sorted(set(names[:len(args)]) & set(data))
        if twice:
            raise TypeError(f"{type(self).__name__} got {twice} both by position and by name")
        data.update(zip(names, args))
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), self.error_where, self.error_type) from None

    # Nested models are validated by pydantic's core, not through this __init__ (the marker
    # pydantic's own RootModel sets on its __init__), so one translation covers the whole tree.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def build(cls, raw: Any, where: str = "") -> Self:
        """Validate a parsed mapping (`where` is its key path, for messages).

        Raises:
            ConfigError (or the class's `error_type`): naming the key, expected and found.
        """
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise config_error(exc, cls, where, cls.error_type) from None


# ------------------------------------------------------------------------- error translation


def _bare(tp: Any) -> Any:
    """`tp` without Annotated metadata and without `| None`."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType):
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _locate(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, Any, FieldInfo | None]:
    """Follow a pydantic error location through the types from `cls`.

    Returns:
        (the dotted key path relative to `cls` ("sources[0].k_shot"), the bare type there
        (None for an unknown key), the FieldInfo of the field there (None inside a list or
        mapping)). A mapping's bad key is located at the mapping, typed as the key.
    """
    path, tp, info = "", cls, None
    for i, part in enumerate(loc):
        tp = _bare(tp)
        origin = get_origin(tp)
        if _is_model(tp):
            info = tp.model_fields.get(part)
            path = f"{path}.{part}" if path else str(part)
            tp = None if info is None else info.annotation
        elif origin is tuple:
            args = get_args(tp)
            path += f"[{part}]"
            tp = args[0] if len(args) == 2 and args[1] is Ellipsis else (args[part] if part < len(args) else None)
            info = None
        elif origin is dict:
            info = None
            if loc[i + 1:i + 2] == ("[key]",):  # pydantic's location of a bad key: (..., key, "[key]")
                tp = get_args(tp)[0]
                break
            path += f".{part}"
            tp = get_args(tp)[1]
        else:
            break
    return path, _bare(tp), info


_TYPE_WORDS = {int: "an integer", float: "a number", str: "str", bool: "bool"}
_MAPPING_ERRORS = ("dict_type", "model_type", "model_attributes_type", "dataclass_type")


def _type_name(tp: Any) -> str:
    """The expected type as a missing-key message names it (Literal: the type of its choices)."""
    tp = _bare(tp)
    if get_origin(tp) is Literal:
        return type(get_args(tp)[0]).__name__
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _found(value: Any) -> str:
    return f"{type(value).__name__} ({value!r})"


def _rule(info: FieldInfo) -> str:
    """The bounds of a field in words: ">= 1", "> 0", "in [0, 1)", "in (0, 1)"."""
    b: dict[str, Any] = {}
    for m in info.metadata:  # annotated_types.Ge(ge=...), Gt(gt=...), ...; Strict and others have none
        for name in ("ge", "gt", "le", "lt"):
            if getattr(m, name, None) is not None:
                b[name] = getattr(m, name)
    low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    high = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    assert high is not None
    return f"{'<=' if high[0] == ']' else '<'} {high[1]}"


def _hint(info: FieldInfo | None) -> str:
    extra = info.json_schema_extra if info is not None else None
    hint = extra.get("hint") if isinstance(extra, dict) else None
    return f" ({hint})" if hint else ""


def _message(err: Any, cls: type[BaseModel]) -> tuple[str, str]:
    """(key path, what is wrong) for one pydantic error (not an unknown key)."""
    kind, value, loc = err["type"], err["input"], tuple(err["loc"])
    if kind == "missing" and loc:
        parent, parent_tp, _ = _locate(cls, loc[:-1])
        if get_origin(parent_tp) is tuple:  # a fixed-length list with too few items
            return parent, f"expected a list of {len(get_args(parent_tp))} items, found {len(value)}"
        path, tp, _ = _locate(cls, loc)
        return path, f"missing required key (expected {_type_name(tp)})"
    path, tp, info = _locate(cls, loc)
    if kind in ("too_short", "too_long"):
        return path, f"expected a list of {len(get_args(tp))} items, found {len(value)}"
    if kind in ("tuple_type", "list_type"):
        return path, f"expected a list, found {_found(value)}"
    if kind in _MAPPING_ERRORS:
        return path, f"expected a mapping, found {_found(value)}"
    if kind == "finite_number" or (kind == "float_type" and isinstance(value, int) and not isinstance(value, bool)):
        return path, f"expected a finite number, found {value!r}"  # inf, nan, or an integer beyond float range
    if kind in ("int_type", "float_type", "string_type", "bool_type"):
        return path, f"expected {_TYPE_WORDS.get(tp, _type_name(tp))}, found {_found(value)}"
    if kind == "literal_error":
        choices = list(get_args(tp))
        if all(isinstance(c, str) for c in choices) and not isinstance(value, str):
            return path, f"expected str, found {_found(value)}"
        return path, f"must be one of {choices}{_hint(info)}, found {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info is not None:
        shown = float(value) if tp is float else value
        return path, f"must be {_rule(info)}{_hint(info)}, found {shown}"
    if kind == "value_error":  # a validator of ours: its message is worded for people already
        text = str(err["ctx"]["error"])
        if _is_model(tp):  # a check across a model's keys names its key first ("heads: must divide ...")
            return (f"{path}.{text}" if path else text), ""
        return path, text
    return path, f"invalid value, found {_found(value)}"  # a type this module does not word yet


def config_error(
    exc: ValidationError, cls: type[BaseModel], where: str = "", error_type: type[Exception] = ConfigError
) -> Exception:
    """The one translation of a pydantic ValidationError into the project's message.

    Reports the first problem (unknown keys first, as they often explain the rest):
    "<where>.<key path>: <what is wrong>", e.g. "meta_train.hparams.maml.inner_lr:
    expected a number, found str ('fast')" or "prepare: unknown key(s) ['colour'];
    valid keys: [...]"; a key the model lists in `renamed_keys` is named with its new name
    ("...; promote.n_episodes was renamed to promote.n_folds").

    Args:
        exc: pydantic's error, from validating `cls`.
        cls: the model validated (to name types and valid keys).
        where: the key path of `cls` itself ("" for params.yaml's top level).
        error_type: the exception class to return.
    """
    errors = exc.errors(include_url=False)
    unknown = [e for e in errors if e["type"] in ("extra_forbidden", "invalid_key")]  # invalid: not a string
    if unknown:
        parent = tuple(unknown[0]["loc"][:-1])
        keys = sorted((e["loc"][-1] for e in unknown if tuple(e["loc"][:-1]) == parent), key=str)
        path, tp, _ = _locate(cls, parent)
        valid = sorted(tp.model_fields) if _is_model(tp) else []
        here = _join(where, path)
        renamed = getattr(tp, "renamed_keys", {}) if _is_model(tp) else {}
        moved = "".join(f"; {_join(here, str(k))} was renamed to {_join(here, renamed[k])}"
                        for k in keys if isinstance(k, str) and k in renamed)
        return error_type(f"{here}: unknown key(s) {keys}; valid keys: {valid}{moved}")
    # A mapping's bad key is reported before the problems of its value, which it often explains.
    keys_first = sorted(errors, key=lambda e: e["loc"][-1:] != ("[key]",))
    path, text = _message(keys_first[0], cls)
    full = _join(where, path)
    return error_type(f"{full}: {text}" if text else full)


def _join(where: str, path: str) -> str:
    if not path:
        return where
    if not where or path.startswith("["):
        return f"{where}{path}"
    return f"{where}.{path}"
