"""absl flags for a `ModelConfig`: `--config=<preset name | file.json>` plus one
`--config.<field>=<value>` override flag per dataclass field.

    config_flags.define_config_flags()
    ...
    cfg = config_flags.config_from_flags()   # validated: a bad value fails before anything runs
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing

from absl import app, flags

from moe_jax.configs import ModelConfig, get_preset, list_presets

_PREFIX = "config."


def _scalar_type(annotation) -> type:
    """The scalar type behind `int`, `int | None`, `Literal["a", "b"]`, ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(inner)
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def define_config_flags(default: str = "tiny-moe", flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define `--config` and every `--config.<field>` flag (unset overrides leave the preset's)."""
    flags.DEFINE_string("config", default, f"preset name ({', '.join(list_presets())}) or a JSON "
                        "file of ModelConfig fields", flag_values=flag_values)
    hints = typing.get_type_hints(ModelConfig)
    definers = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool,
                str: flags.DEFINE_string}
    for field in dataclasses.fields(ModelConfig):
        kind = _scalar_type(hints[field.name])
        definers[kind](_PREFIX + field.name, None, f"override ModelConfig.{field.name} ({kind.__name__})",
                       flag_values=flag_values)


def load_config(name_or_path: str) -> ModelConfig:
    """A preset by name, or a JSON file of fields (e.g. a workdir's `config.json`)."""
    if os.path.exists(name_or_path):
        with open(name_or_path) as f:
            fields = json.load(f)
        fields = fields.get("model", fields)
        unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ValueError(f"{name_or_path}: unknown ModelConfig fields {sorted(unknown)}")
        return ModelConfig(**fields)
    return get_preset(name_or_path)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ModelConfig:
    """The `--config` preset with every `--config.<field>` override applied and validated; a bad
    value is reported as a usage error naming the field, before anything is built."""
    overrides = {f.name: flag_values[_PREFIX + f.name].value for f in dataclasses.fields(ModelConfig)
                 if flag_values[_PREFIX + f.name].present}
    try:
        return dataclasses.replace(load_config(flag_values.config), **overrides)
    except (KeyError, ValueError) as e:
        raise app.UsageError(str(e)) from e
