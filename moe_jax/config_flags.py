"""absl flags for an `ExperimentConfig`, with ml_collections `config_flags` semantics:
`--config=<model preset name | config.json>` picks the base, and `--config.<field>=<value>` /
`--config.model.<field>=<value>` override any field, typed and validated.

    config_flags.define_config_flags()
    ...
    app.run(main, flags_parser=config_flags.parse_flags)   # unknown fields list the valid ones
    cfg = config_flags.config_from_flags()                 # a bad value fails before anything runs

Precedence: the script's defaults < the preset or file < the override flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any

from absl import app, flags

from moe_jax.configs import ModelConfig, get_preset, list_presets
from moe_jax.train.experiment_config import RETIRED_FIELDS, ExperimentConfig, check_known

_PREFIX = "config."
_MODEL_PREFIX = "config.model."


def _scalar_type(annotation) -> type:
    """The scalar type behind `int`, `int | None`, `Literal["a", "b"]`, ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(inner)
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def _override_fields(config_class: type[ExperimentConfig] = ExperimentConfig) -> dict[str, tuple[type, str]]:
    """Flag name -> (type, help) for every experiment field and every model field."""
    fields = {}
    for cls, prefix in ((config_class, _PREFIX), (ModelConfig, _MODEL_PREFIX)):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name != "model":
                kind = _scalar_type(hints[field.name])
                fields[prefix + field.name] = (kind, f"override {cls.__name__}.{field.name} ({kind.__name__})")
    return fields


def define_config_flags(default: str = "tiny-moe", flag_values: flags.FlagValues = flags.FLAGS, *,
                        config_class: type[ExperimentConfig] = ExperimentConfig) -> None:
    """Define `--config` and one override flag per field of `config_class` (e.g. `GRPOConfig`) and
    of its model (unset overrides leave the base's)."""
    flags.DEFINE_string("config", default, f"model preset ({', '.join(list_presets())}) or a JSON "
                        "file: an experiment config (e.g. a workdir's config.json) or ModelConfig "
                        "fields", flag_values=flag_values)
    definers = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool,
                str: flags.DEFINE_string}
    for name, (kind, help_text) in _override_fields(config_class).items():
        definers[kind](name, None, help_text, flag_values=flag_values)


def _unknown_config_flags(argv: list[str], known: set[str]) -> list[str]:
    unknown = []
    for arg in argv[1:]:
        if arg == "--":
            break
        name = arg.lstrip("-").split("=", 1)[0]
        if name.startswith("no" + _PREFIX):
            name = name[2:]
        if name.startswith(_PREFIX) and name not in known:
            unknown.append(name)
    return unknown


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's parser, but an unknown `--config.<field>` is reported with the list of valid fields
    (pass as `app.run(main, flags_parser=config_flags.parse_flags)`)."""
    known = {name for name in flag_values if name.startswith(_PREFIX)}
    unknown = _unknown_config_flags(argv, known)
    if unknown:
        prefix = _MODEL_PREFIX if all(u.startswith(_MODEL_PREFIX) for u in unknown) else _PREFIX
        valid = [name.removeprefix(_PREFIX) for name in flag_values if name.startswith(prefix)]
        retired = [f"{name}: removed, {RETIRED_FIELDS[name.removeprefix(_PREFIX)]}\n" for name in unknown
                   if name.removeprefix(_PREFIX) in RETIRED_FIELDS]
        sys.stderr.write(f"FATAL Flags parsing error: unknown config field(s) {unknown}.\n{''.join(retired)}"
                         f"Valid fields: {', '.join(valid)}\n")
        sys.exit(1)
    return app.parse_flags_with_usage(argv)


def load_base(name_or_path: str, defaults: dict[str, Any],
              config_class: type[ExperimentConfig] = ExperimentConfig,
              model_defaults: dict[str, Any] | None = None) -> ExperimentConfig:
    """The script's `defaults` with a model preset by name (with `model_defaults` applied), or
    updated from a JSON file that holds either an experiment config (`{"model": {...}, "steps":
    ...}`) or bare ModelConfig fields (the file's model fields win over `model_defaults`)."""
    model_defaults = model_defaults or {}
    if not os.path.exists(name_or_path):
        return config_class(model=dataclasses.replace(get_preset(name_or_path), **model_defaults), **defaults)
    with open(name_or_path) as f:
        fields = json.load(f)
    if "model" not in fields:
        check_known(ModelConfig, fields)
        fields = {"model": fields}
    return config_class.from_dict({**defaults, **fields, "model": {**model_defaults, **fields["model"]}})


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS, *,
                      defaults: dict[str, Any] | None = None,
                      config_class: type[ExperimentConfig] = ExperimentConfig,
                      model_defaults: dict[str, Any] | None = None) -> ExperimentConfig:
    """The base config with every set override flag applied and the result validated; a bad
    value is a usage error naming the field, raised before anything is built. `defaults` and
    `model_defaults` are the script's (run and model fields, under the preset or file's)."""
    overrides = {name.removeprefix(_PREFIX): flag_values[name].value for name in _override_fields(config_class)
                 if flag_values[name].present}
    model_overrides = {k.removeprefix("model."): v for k, v in overrides.items() if k.startswith("model.")}
    top_overrides = {k: v for k, v in overrides.items() if not k.startswith("model.")}
    try:
        base = load_base(flag_values.config, defaults or {}, config_class, model_defaults)
        model = dataclasses.replace(base.model, **model_overrides)
        return dataclasses.replace(base, model=model, **top_overrides)
    except (KeyError, ValueError) as e:
        raise app.UsageError(str(e)) from e
