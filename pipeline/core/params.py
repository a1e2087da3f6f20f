"""The strict ``params.yaml`` loader: a section as a typed dataclass, with unknown keys, wrong types
and out-of-range values refused naming the file and the dotted key; params hashes and differences.

Each section's dataclass lives beside the code that reads it (``pipeline/<stage>/params.py``), so a
stage's DVC closure holds only the settings that can change its outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.core.errors import ParamsError

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")
SECTIONS = ("data", "teacher", "cache", "student", "evaluate")
"""The top-level sections of ``params.yaml``, one per stage; any other top-level key is a typo."""


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice (plain YAML keeps the last copy without a word)."""


class ParamsLoader(yaml.SafeLoader):
    """YAML as people write params files: a key given twice in one mapping is refused, and ``1e-3``
    is a float (YAML 1.1, which PyYAML follows, reads it as text: it wants ``1.0e-3``)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first_line:
                raise DuplicateKeyError(f"line {key_node.start_mark.line + 1}: {key!r} appears twice (also on line "
                                        f"{first_line[key] + 1}); only one copy can count, so delete the other")
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


# YAML 1.2's float syntax (exponents without a dot), which DVC's own YAML reader already follows.
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _check(where: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check(where, value, option)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ParamsError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):  # YAML's .inf and .nan
        raise ParamsError(f"{where}: must be a finite number, got {value!r}")
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ParamsError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types; ``__post_init__`` checks ranges."""
    if data is None:  # `key:` with nothing under it: usually its keys lost their indentation
        raise ParamsError(f"{where}: empty (are its keys indented under it?); write '{{}}' for every default")
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{where}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {name: _check(f"{where}.{name}", value, hints[name]) for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as err:
        raise ParamsError(f"{where}.{err}") from err


def read_params(path: str | Path = PARAMS_FILE) -> dict:
    """The params file's sections (a mapping of the known section names)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(), Loader=ParamsLoader) or {}
    except DuplicateKeyError as err:
        raise ParamsError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {data!r}")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ParamsError(f"{path}:{unknown[0]}: unknown section (known sections: {', '.join(SECTIONS)})")
    return data


def load_section(cls: type[T], section: str, path: str | Path = PARAMS_FILE) -> T:
    """Section ``section`` of the params file at ``path`` as dataclass ``cls``."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{Path(path)}: no '{section}' section")
    return from_mapping(cls, data[section], f"{Path(path)}:{section}")


def load_key(section: str, key: str, path: str | Path = PARAMS_FILE) -> Any:
    """One key of a section another stage owns (None when absent), for the few settings stages
    share (``evaluate.scorer``: every stage that judges completions); dvc.yaml lists it under each
    stage that reads it. The owner's dataclass checks the whole section."""
    values = read_params(path).get(section) or {}
    return values.get(key) if isinstance(values, dict) else None


def require(condition: bool, key: str, message: str) -> None:
    """Range check for ``__post_init__``: raises ``ValueError("key: message")``."""
    if not condition:
        raise ValueError(f"{key}: {message}")


def require_at_least(section: Any, minimum: float, *keys: str) -> None:
    """``require(section.key >= minimum)`` for each key."""
    for key in keys:
        require(getattr(section, key) >= minimum, key, f"must be >= {minimum}")


SEED_LIMIT = 2**63
"""Seeds are int64 counters (torch generators, the counter-based hashes): 0 <= seed < 2**63."""


def require_seed(section: Any, key: str = "seed") -> None:
    """A seed is an integer in [0, 2**63)."""
    value = getattr(section, key)
    require(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT, key,
            f"must be an integer in [0, 2**63), got {value!r}")


def require_time_cap(minutes: float | None, key: str = "max_minutes") -> None:
    """A wall-clock cap is null (none) or a finite number of minutes > 0."""
    require(minutes is None or 0 < minutes < math.inf, key, f"must be a finite number of minutes > 0 or null, got {minutes!r}")


def flatten(data: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts (or dataclasses) as ``{dotted key: leaf value}``, keys under ``prefix``."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(old: Any, new: Any, prefix: str) -> list[str]:
    """``"key: old -> new"`` for each dotted key whose value differs between two nested mappings."""
    a, b = flatten(old, prefix), flatten(new, prefix)
    return [f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def params_hash(*sections: Any) -> str:
    """A stable hash of dataclass sections or dicts (for refusing caches made with other params)."""
    blob = json.dumps([s if isinstance(s, dict) else dataclasses.asdict(s) for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
