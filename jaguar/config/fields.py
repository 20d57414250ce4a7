"""The machinery behind the typed config: allowed ranges of numeric fields, conversion of a YAML or
command-line value to a field's declared type (`Literal` choices, lists, a square size given as one
number), and setting dotted keys with errors that name the key, the bad value and the nearest valid one."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from jaguar.errors import JaguarError


class ConfigError(JaguarError, ValueError):
    """A configuration problem; the message names the key or file at fault and what to do."""


_ENDPOINTS = {"inf": math.inf, "-inf": -math.inf}


@dataclass(frozen=True)
class Interval:
    """The values a numeric field may take, in interval notation: "[0, 1)", "(0, inf)", "[1, 8]"."""
    text: str

    def _bounds(self) -> tuple[float, float]:
        low, high = (part.strip() for part in self.text[1:-1].split(","))
        return tuple(_ENDPOINTS[p] if p in _ENDPOINTS else float(p) for p in (low, high))  # type: ignore

    def __contains__(self, value: float) -> bool:
        low, high = self._bounds()
        above = value > low if self.text[0] == "(" else value >= low
        below = value < high if self.text[-1] == ")" else value <= high
        return above and below  # NaN lies in no interval

    def describe(self) -> str:
        """'> 0', '>= 1' for half-lines, 'in [0, 1)' otherwise."""
        low_text, high_text = (part.strip() for part in self.text[1:-1].split(","))
        if high_text == "inf":
            return f"{'>' if self.text[0] == '(' else '>='} {low_text}"
        return f"in {self.text}"


def ranged(default: Any, interval: str, why: str = "", length: int = 0, repeat: bool = False) -> Any:
    """A dataclass field whose value (each item, for a list) must lie in `interval`.

    why: the reason, given in the error, where values outside are unsafe rather than meaningless.
    length: the number of items a list field must have. repeat: one number stands for all items
    (`img_size=224` is 224 x 224, as timm and users write a square size)."""
    meta = {"range": Interval(interval), "why": why, "length": length, "repeat": repeat}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _did_you_mean(value: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(value, candidates, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _choice(key: str, value: Any, choices: tuple, where: str) -> Any:
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
        if isinstance(choice, int) and isinstance(value, str) and value.strip() == str(choice):
            return choice
    hint = _did_you_mean(str(value), [str(c) for c in choices])
    raise ConfigError(f"config key '{key}'{where} is {value!r}; choose one of "
                      f"{', '.join(str(c) for c in choices)}{hint}")


def convert(key: str, value: Any, ftype: Any, meta: typing.Mapping, where: str = "") -> Any:
    """`value` (parsed YAML, a recipe's Python value) as the field's declared type, inside its range."""
    origin = typing.get_origin(ftype)
    if origin is Literal:
        return _choice(key, value, typing.get_args(ftype), where)
    if origin is list:
        (item_type,) = typing.get_args(ftype)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        length = meta.get("length", 0)
        if meta.get("repeat") and len(items) == 1 and length:
            items = items * length
        if length and len(items) != length:
            raise ConfigError(f"config key '{key}'{where} takes {length} values, got {value!r}")
        return [convert(key, item, item_type, meta, where) for item in items]
    bad = ConfigError(f"config key '{key}'{where} expects {getattr(ftype, '__name__', ftype)}, "
                      f"got {value!r} ({type(value).__name__})")
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if ftype is str:
        if isinstance(value, (dict, list, tuple)):
            raise bad
        return "" if value is None else str(value)
    if isinstance(value, bool):
        raise bad
    if ftype is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise bad
    elif ftype is float:
        try:
            value = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            value = None
        if value is None:
            raise bad
    interval = meta.get("range")
    if interval is not None and value not in interval:
        why = f" ({meta['why']})" if meta.get("why") else ""
        raise ConfigError(f"config key '{key}'{where} must be {interval.describe()}, got {value!r}{why}")
    return value


# ---------------------------------------------------------------- dotted keys


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The declared field types of a config class (resolved once; annotations are strings here)."""
    return typing.get_type_hints(cls)


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of the dataclass `cls`, nested groups expanded."""
    hints = type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(leaf_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def unknown_key(key: str, keys: list[str], where: str) -> ConfigError:
    """The error for a key that is not in `keys`, suggesting the nearest one: the same name in the
    same group (`retrieval.k1` -> `retrieval.post.k1`), else the closest spelling, else the same name."""
    leaf, group = key.rsplit(".", 1)[-1], key.split(".", 1)[0]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = ([k for k in same_leaf if k.split(".", 1)[0] == group]
             or difflib.get_close_matches(key, keys, n=1, cutoff=0.5) or same_leaf)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}; `jaguar config show RECIPE` lists every key")


def field_of(root: Any, dotted: str) -> tuple[Any, dataclasses.Field, Any] | None:
    """(the group instance holding `dotted`, its field, its declared type), or None if there is none."""
    target = root
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            return None
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields:
            return None
        if depth == len(parts) - 1:
            return target, fields[part], type_hints(type(target))[part]
        target = getattr(target, part)
    return None


def set_value(root: Any, dotted: str, value: Any, where: str = "", prefix: str = "") -> None:
    """Set `dotted` (relative to the dataclass `root`, whose own key is `prefix`) to `value`,
    converted to the field's type and checked against its choices and range."""
    found = field_of(root, dotted)
    if found is None:
        raise unknown_key(prefix + dotted, leaf_keys(type(root), prefix), where)
    group, fld, ftype = found
    if dataclasses.is_dataclass(ftype):
        raise ConfigError(f"config key '{prefix + dotted}'{where} is a group; set its keys "
                          f"({', '.join(leaf_keys(ftype, prefix + dotted + '.'))})")
    setattr(group, fld.name, convert(prefix + dotted, value, ftype, fld.metadata, where))


def apply_mapping(root: Any, mapping: Any, where: str = "", prefix: str = "") -> None:
    """Set every key of a nested mapping (a YAML file, a recipe's dict, tune-post's result) on `root`."""
    if not isinstance(mapping, dict):
        names = ", ".join(f.name for f in dataclasses.fields(root))
        raise ConfigError(f"config{' group ' + prefix.rstrip('.') if prefix else ''}{where} must be a "
                          f"mapping of keys ({names}), got {mapping!r}")
    hints = type_hints(type(root))
    for key, value in mapping.items():
        if str(key) in hints and dataclasses.is_dataclass(hints[str(key)]):
            apply_mapping(getattr(root, str(key)), value, where, f"{prefix}{key}.")
        else:
            set_value(root, str(key), value, where, prefix)
