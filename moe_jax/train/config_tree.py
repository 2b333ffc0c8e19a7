"""Configs built from nested frozen dataclasses: reading, changing and comparing them by path.

A run's config is a tree (`ExperimentConfig.optimizer.learning_rate`, `GRPOConfig.sampling.
temperature`, `...teacher.model.n_layers`); these helpers walk it to any depth, so the flag layer,
`config.json` and the workdir's conflict check need no per-field code.

A config's **identity** is what decides whether two runs (or two graph steps) compute the same
thing. It is declared once, on the fields: `not_identity(default, why)` marks a field that changes
only how a run goes (cadence, layout, budgets, logging), and `added(default)` a field added after
runs existed, whose default computes what was computed before it (left out of the identity at that
value, so older runs and steps keep their identity). The run driver's resume check and the
executor's step keys both read it (`identity`, `non_identity_paths`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

from moe_jax.errors import InputError

_IDENTITY, _NEUTRAL, _DERIVED = "identity", "neutral", "derived"


def not_identity(default: Any = dataclasses.MISSING, *, why: str, default_factory: Any = dataclasses.MISSING
                 ) -> Any:
    """A dataclass field that does not change what a run computes (`why` says what it changes):
    a resumed run may change it, and a graph step's key leaves it out."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_IDENTITY: False, "why": why})


def added(default: Any) -> Any:
    """A dataclass field added after runs existed, whose `default` computes what runs computed before
    it: at that value it is left out of the identity, so those runs' keys stay as they were."""
    return dataclasses.field(default=default, metadata={_NEUTRAL: default})


def derived_part(default_factory: Callable[[], Any], *, derived: tuple[str, ...]) -> Any:
    """A part of a tree whose fields at the `derived` paths (relative to the part) are not its own:
    the tree computes them from its other fields (a pipeline stage's model is the pipeline's). They
    are no flags, and no part of the tree's identity or of what it saves."""
    return dataclasses.field(default_factory=default_factory, metadata={_DERIVED: derived})


def derived_paths(cls: type, prefix: str = "") -> list[str]:
    """Every path of `cls`'s tree that a `derived_part` leaves to the tree, to any depth."""
    paths = []
    for field in dataclasses.fields(cls):
        paths += [f"{prefix}{field.name}.{p}" for p in field.metadata.get(_DERIVED, ())]
        inner = nested_class(cls, field.name)
        if inner is not None:
            paths += derived_paths(inner, f"{prefix}{field.name}.")
    return paths


def _is_identity(field: dataclasses.Field, value: Any) -> bool:
    if not field.metadata.get(_IDENTITY, True):
        return False
    return not (_NEUTRAL in field.metadata and value == field.metadata[_NEUTRAL])


def _own_fields(tree: Any, derived: tuple[str, ...]) -> Iterator[tuple[dataclasses.Field, Any, tuple[str, ...]]]:
    """(field, value, the derived paths inside it) of a dataclass, but the fields `derived` names."""
    for field in dataclasses.fields(tree):
        if field.name not in derived:
            inside = tuple(p.split(".", 1)[1] for p in derived if p.startswith(field.name + "."))
            yield field, getattr(tree, field.name), inside + field.metadata.get(_DERIVED, ())


def _is_config(tree: Any) -> bool:
    return dataclasses.is_dataclass(tree) and not isinstance(tree, type)


def identity(tree: Any, derived: tuple[str, ...] = ()) -> Any:
    """The JSON-able identity of a config tree (dataclasses, mappings, sequences, scalars): every
    field but those `not_identity` declares, those `added` at their neutral value and those a
    `derived_part` leaves to its tree."""
    if _is_config(tree):
        return {f.name: identity(v, inside) for f, v, inside in _own_fields(tree, derived) if _is_identity(f, v)}
    if isinstance(tree, Mapping):
        return {str(k): identity(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [identity(v) for v in tree]
    return tree


def as_json(tree: Any, derived: tuple[str, ...] = ()) -> Any:
    """A config tree as JSON-able values: `identity`'s shape with the fields outside the identity
    kept (what a person reads in a step's record, what a tree saves)."""
    if _is_config(tree):
        return {f.name: as_json(v, inside) for f, v, inside in _own_fields(tree, derived)}
    if isinstance(tree, Mapping):
        return {str(k): as_json(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [as_json(v) for v in tree]
    return tree


def non_identity_paths(tree: Any, prefix: str = "", derived: tuple[str, ...] = ()) -> set[str]:
    """The dotted paths of a config tree (as `dataclasses.asdict` has them) that `identity(tree)`
    leaves out."""
    if _is_config(tree):
        paths = {prefix + p for p in derived}
        for f, value, inside in _own_fields(tree, derived):
            paths |= {prefix + f.name} if not _is_identity(f, value) else non_identity_paths(
                value, f"{prefix}{f.name}.", inside)
        return paths
    if isinstance(tree, Mapping):
        return set().union(*(non_identity_paths(v, f"{prefix}{k}.") for k, v in tree.items()))
    return set()


def not_identity_fields(cls: type, prefix: str = "") -> set[str]:
    """The paths of `cls`'s tree declared `not_identity` (known from the class, without a config)."""
    paths = set()
    for field in dataclasses.fields(cls):
        inner = nested_class(cls, field.name)
        if not field.metadata.get(_IDENTITY, True):
            paths.add(prefix + field.name)
        elif inner is not None:
            paths |= not_identity_fields(inner, f"{prefix}{field.name}.")
    return paths


def without_paths(tree: Any, paths: set[str], prefix: str = "") -> Any:
    """A JSON tree (e.g. a config saved before today's identity was declared) without `paths`."""
    if not isinstance(tree, Mapping):
        return tree
    return {k: without_paths(v, paths, f"{prefix}{k}.") for k, v in tree.items() if prefix + k not in paths}


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
    re-validates (a part's error names the path the change was given at, e.g. `sft.steps`, not
    the class field `ExperimentConfig.steps`); an unknown field raises a ValueError listing the
    valid ones."""
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
    try:
        return dataclasses.replace(config, **direct)
    except ValueError as e:  # a config's own check (InputError, or a model/sampling config's ValueError)
        field, colon, problem = str(e).partition(": ")
        owner, _, name = field.partition(".")
        if not (prefix and colon and owner == type(config).__name__):
            raise
        raise InputError(f"{prefix}{name} ({field}): {problem}") from None


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
    """What a frozen-dataclass config tree (a run's, a pipeline's, a distillation's) needs to be
    saved and read back: `to_dict` (its own fields: what its parts derive from it is left out),
    `to_json`, and `from_dict` of that shape, today's or an older one (`migrate`: `MOVED_FIELDS`
    maps old flat names to their paths, `RETIRED_FIELDS` names the fields dropped, with why)."""

    MOVED_FIELDS: ClassVar[Mapping[str, str]] = {}
    RETIRED_FIELDS: ClassVar[Mapping[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return as_json(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def migrate(cls, fields: Mapping[str, Any]) -> dict[str, Any]:
        """A saved config's fields in today's shape: moved flat names put at their paths, retired
        ones dropped."""
        moved = {cls.MOVED_FIELDS[k]: v for k, v in fields.items() if k in cls.MOVED_FIELDS}
        kept = {k: v for k, v in fields.items() if k not in cls.MOVED_FIELDS and k not in cls.RETIRED_FIELDS}
        return nest({**kept, **moved})

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Any:
        """Inverse of `to_dict`; a part given in part keeps its other fields' defaults; unknown
        fields are an error."""
        return build(cls, cls.migrate(fields))
