"""absl flags for a run config, with ml_collections `config_flags` semantics:
`--config=<model preset name | config.json>` picks the base, and `--config.<path>=<value>`
overrides any field of the config tree, to any depth (`--config.steps=5`,
`--config.optimizer.learning_rate=1e-4`, `--config.sampling.temperature=0.7`,
`--config.model.n_layers=4`), typed and validated.

    config_flags.define_config_flags(config_class=GRPOConfig)
    ...
    app.run(main, flags_parser=config_flags.parse_flags)   # unknown fields list the valid ones
    cfg = config_flags.config_from_flags(config_class=GRPOConfig)  # a bad value fails before anything runs

Precedence: the class's defaults < the recipe's < the preset or file < the override flags. A flag
whose field moved (`--config.learning_rate`) fails naming its new path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

from absl import app, flags, logging

from moe_jax.configs import ModelConfig, get_preset, list_presets
from moe_jax.train import config_tree
from moe_jax.train.experiment_config import ExperimentConfig, RunConfig

CONFIG_PREFIX = "config."
# The config class each FlagValues' --config flags were defined for (for parse_flags' messages).
_DEFINED_FOR: dict[int, type[RunConfig]] = {}


def _scalar_type(annotation) -> type:
    """The scalar type behind `int`, `int | None`, `Literal["a", "b"]`, ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(inner)
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def override_fields(config_class: type[RunConfig]) -> dict[str, tuple[type, str]]:
    """Flag name -> (type, help) for every scalar field of the config tree (but the paths a tree
    derives from its other fields: `config_tree.derived_part`, e.g. a pipeline stage's model)."""
    derived = tuple(config_tree.derived_paths(config_class))
    fields = {}
    for path, (owner, hint) in config_tree.leaf_fields(config_class).items():
        if any(path == d or path.startswith(d + ".") for d in derived):
            continue
        kind = _scalar_type(hint)
        fields[CONFIG_PREFIX + path] = (kind, f"override {owner.__name__}.{path.rsplit('.', 1)[-1]} ({kind.__name__})")
    return fields


def define_config_flags(default: str = "tiny-moe", flag_values: flags.FlagValues = flags.FLAGS, *,
                        config_class: type[RunConfig] = ExperimentConfig) -> None:
    """Define `--config` and one override flag per scalar field of `config_class`'s tree (unset
    overrides leave the base's)."""
    flags.DEFINE_string("config", default, f"model preset ({', '.join(list_presets())}) or a JSON "
                        "file: a run config (e.g. a workdir's config.json) or ModelConfig fields",
                        flag_values=flag_values)
    definers = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool,
                str: flags.DEFINE_string}
    for name, (kind, help_text) in override_fields(config_class).items():
        definers[kind](name, None, help_text, flag_values=flag_values)
    _DEFINED_FOR[id(flag_values)] = config_class


def _unknown_config_flags(argv: list[str], known: set[str]) -> list[str]:
    unknown = []
    for arg in argv[1:]:
        if arg == "--":
            break
        name = arg.lstrip("-").split("=", 1)[0]
        if name.startswith("no" + CONFIG_PREFIX):
            name = name[2:]
        if name.startswith(CONFIG_PREFIX) and name not in known:
            unknown.append(name)
    return unknown


def _why_unknown(name: str, config_class: type[RunConfig] | None) -> str:
    field = name.removeprefix(CONFIG_PREFIX)
    if config_class is not None and field in config_class.MOVED_FIELDS:
        return f"{name}: moved, now --{CONFIG_PREFIX}{config_class.MOVED_FIELDS[field]}\n"
    if config_class is not None and field in config_class.RETIRED_FIELDS:
        return f"{name}: removed, {config_class.RETIRED_FIELDS[field]}\n"
    return ""


def valid_fields(config_class: type[RunConfig], part: str = "") -> list[str]:
    """The override paths of `config_class` under `part` (e.g. "model."); for the whole tree, the
    run's fields, then the model's long list summed up."""
    valid = [name.removeprefix(CONFIG_PREFIX) for name in override_fields(config_class)]
    valid = [name for name in valid if name.startswith(part)]
    if part:
        return valid
    model_fields = [name for name in valid if name.startswith("model.")]
    return [name for name in valid if not name.startswith("model.")] + (
        [f"model.<one of {len(model_fields)} ModelConfig fields: --helpfull lists them>"] if model_fields else [])


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's parser, but an unknown `--config.<path>` is reported with the valid fields of its
    part (and, for a field that moved, its new path) (pass as
    `app.run(main, flags_parser=config_flags.parse_flags)`)."""
    known = {name for name in flag_values if name.startswith(CONFIG_PREFIX)}
    unknown = _unknown_config_flags(argv, known)
    if unknown:
        # The deepest part every unknown name is inside (e.g. "config.model."), else the whole tree.
        parts = {u.rsplit(".", 1)[0] + "." for u in unknown}
        prefix = parts.pop() if len(parts) == 1 else CONFIG_PREFIX
        if not any(name.startswith(prefix) for name in known):
            prefix = CONFIG_PREFIX
        config_class = _DEFINED_FOR.get(id(flag_values))
        sys.stderr.write(f"FATAL Flags parsing error: unknown config field(s) {unknown}.\n"
                         + "".join(_why_unknown(u, config_class) for u in unknown)
                         + f"Valid fields: {', '.join(valid_fields(config_class, prefix.removeprefix(CONFIG_PREFIX)))}\n")
        sys.exit(1)
    return app.parse_flags_with_usage(argv)


def load_base(name_or_path: str, defaults: Mapping[str, Any], config_class: type[RunConfig] = ExperimentConfig,
              model_defaults: Mapping[str, Any] | None = None) -> RunConfig:
    """`config_class` with the script's `defaults` (paths or nested dicts) on a model preset by
    name (with `model_defaults` applied), or updated from a JSON file that holds either a run
    config (`{"model": {...}, "steps": ...}`, today's shape or an older flat one) or bare
    ModelConfig fields (the file's model fields win over `model_defaults`)."""
    model_defaults = dict(model_defaults or {})
    if not os.path.exists(name_or_path):
        model = dataclasses.replace(get_preset(name_or_path), **model_defaults)
        return config_tree.build(config_class, {**config_tree.nest(defaults), "model": model})
    try:
        with open(name_or_path, encoding="utf-8") as f:
            fields = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"--config={name_or_path}: not a JSON file ({e}{where}). Fix: give a model preset "
                         f"({', '.join(list_presets())}) or a JSON config file (a workdir's config.json)") from None
    if not isinstance(fields, dict):  # a usage error like the others here, not a programming error
        raise ValueError(f"--config={name_or_path}: holds a JSON {type(fields).__name__}, not an object. "  # noqa: TRY004
                         "Fix: give a run config or ModelConfig fields as one JSON object")
    if "model" not in fields:
        config_tree.check_known(ModelConfig, fields)
        fields = {"model": fields}
    missing = sorted({f.name for f in dataclasses.fields(ModelConfig)} - set(fields["model"]))
    if missing:  # said, not silent: these come from ModelConfig's defaults, not from a preset
        logging.warning("--config=%s gives %d of ModelConfig's fields; the other %d take ModelConfig's defaults "
                        "(not a preset's): %s. To start from a preset instead: --config=<preset> "
                        "--config.model.<field>=...", name_or_path, len(fields["model"]), len(missing),
                        ", ".join(missing))
    file_tree = config_class.migrate(fields)
    merged = {**config_tree.flatten(config_tree.nest(defaults)), **config_tree.flatten({"model": model_defaults}),
              **config_tree.flatten(file_tree)}
    return config_class.from_dict(config_tree.nest(merged))


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS, *,
                      defaults: Mapping[str, Any] | None = None,
                      config_class: type[RunConfig] = ExperimentConfig,
                      model_defaults: Mapping[str, Any] | None = None) -> RunConfig:
    """The base config with every set override flag applied and the result validated; a bad
    value ends the script with one `FATAL` line naming the flag's path and the fix, before
    anything is built. `defaults` and
    `model_defaults` are the script's (run fields by path, and model fields, under the preset or
    file's)."""
    overrides = {name.removeprefix(CONFIG_PREFIX): flag_values[name].value for name in override_fields(config_class)
                 if flag_values[name].present}
    try:
        return config_tree.override(load_base(flag_values.config, defaults or {}, config_class, model_defaults),
                                    overrides)
    except (KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        sys.stderr.write(f"FATAL bad --config: {message}\n")
        sys.exit(1)
