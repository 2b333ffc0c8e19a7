"""Configs built from nested frozen dataclasses: reading, changing and comparing them by path.

A run's config is a tree (`ExperimentConfig.optimizer.learning_rate`, `GRPOConfig.sampling.
temperature`, `...teacher.model.n_layers`); these helpers walk it to any depth, so the flag layer,
`config.json` and the workdir's conflict check need no per-field code.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any, ClassVar


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def nested_class(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls`, or None for a scalar field."""
    hint = _hints(cls)[name]
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[type, Any]]:
    """Every scalar field of the tree, by dotted path -> (owning class, type annotation)."""
    leaves = {}
    for field in dataclasses.fields(cls):
        inner = nested_class(cls, field.name)
        if inner is not None:
            leaves.update(leaf_fields(inner, f"{prefix}{field.name}."))
        else:
            leaves[prefix + field.name] = (cls, _hints(cls)[field.name])
    return leaves


def leaf_values(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every scalar field's value of a config tree, by dotted path."""
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            values.update(leaf_values(value, f"{prefix}{field.name}."))
        else:
            values[prefix + field.name] = value
    return values


def check_known(cls: type, fields: Mapping[str, Any], prefix: str = "") -> None:
    """Raise a ValueError naming unknown fields and listing the valid ones."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"unknown config field(s) {[prefix + u for u in unknown]}. Valid fields: "
                         + ", ".join(prefix + v for v in valid))


def nest(changes: Mapping[str, Any]) -> dict[str, Any]:
    """`{"optimizer.learning_rate": 1e-3}` -> `{"optimizer": {"learning_rate": 1e-3}}` (nested
    dicts pass through, merged with dotted keys)."""
    tree: dict[str, Any] = {}
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, Mapping) and isinstance(tree.get(head), dict):
            tree[head] = nest({**flatten(tree[head]), **flatten(value)})  # merged at every depth
        else:
            tree[head] = nest(value) if isinstance(value, Mapping) else value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`nest`'s inverse: `{"loop": {"eval_every": 1}}` -> `{"loop.eval_every": 1}`."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


_SCALARS = (bool, int, float, str)


def check_type(cls: type, name: str, value: Any, prefix: str = "") -> None:
    """A ValueError naming the field when `value` is not of the scalar type field `name` of `cls`
    declares (an int passes for a float; a bool never passes for a number)."""
    hint = _hints(cls)[name]
    allowed = tuple(t for t in typing.get_args(hint) or (hint,) if t in _SCALARS or t is type(None))
    if not allowed:
        return
    if float in allowed and not isinstance(value, bool) and isinstance(value, int):
        return
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"{cls.__name__}.{name} ({prefix}{name}): expected {wanted}, got "
                         f"{type(value).__name__} {value!r}. Fix: write a {wanted}")


def override(config: Any, changes: Mapping[str, Any], prefix: str = "") -> Any:
    """A copy of `config` with `changes` applied: dotted paths (`"optimizer.learning_rate"`) or
    nested dicts, to any depth; a changed part keeps its other fields. Every changed dataclass
    re-validates; an unknown field raises a ValueError listing the valid ones."""
    cls = type(config)
    tree = nest(changes)
    check_known(cls, tree, prefix)
    direct = {}
    for name, value in tree.items():
        if nested_class(cls, name) is not None and isinstance(value, Mapping):
            value = override(getattr(config, name), value, f"{prefix}{name}.")
        elif nested_class(cls, name) is None:
            check_type(cls, name, value, prefix)
        direct[name] = value
    return dataclasses.replace(config, **direct)


def differences(saved: Mapping[str, Any], new: Mapping[str, Any], skip: tuple[str, ...] = (),
                prefix: str = "") -> list[str]:
    """Human-readable `path: saved -> new` lines for every leaf that differs (recursively), except
    the paths in `skip`."""
    lines = []
    for key in sorted(set(saved) | set(new)):
        path = prefix + key
        if path in skip:
            continue
        old_value, new_value = saved.get(key), new.get(key)
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            lines += differences(old_value, new_value, skip, prefix=f"{path}.")
        elif old_value != new_value:
            lines.append(f"{path}: {old_value!r} (saved) -> {new_value!r} (this command)")
    return lines


def build(cls: type, tree: Mapping[str, Any], prefix: str = "") -> Any:
    """`cls` from a nested dict (`dataclasses.asdict`'s shape): a nested part given as a dict is
    that field's default with the dict's fields applied, so a part given in part keeps the
    rest; unknown fields raise a ValueError listing the valid ones."""
    check_known(cls, tree, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in tree.items():
        if nested_class(cls, name) is not None and isinstance(value, Mapping):
            field = fields[name]
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            value = override(default, value, f"{prefix}{name}.")
        elif nested_class(cls, name) is None:
            check_type(cls, name, value, prefix)
        kwargs[name] = value
    return cls(**kwargs)


class TreeConfig:
    """What a frozen-dataclass config tree that is not a run (a pipeline's, a distillation's) needs
    to be saved and read back: `to_dict`, and `from_dict` of its nested-dict shape."""

    MOVED_FIELDS: ClassVar[Mapping[str, str]] = {}
    RETIRED_FIELDS: ClassVar[Mapping[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def migrate(cls, fields: Mapping[str, Any]) -> dict[str, Any]:
        return nest(fields)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Any:
        return build(cls, cls.migrate(fields))
