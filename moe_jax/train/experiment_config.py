"""`ExperimentConfig`: one training run (pretraining or SFT) — the model, the data, the optimizer
and the loop's cadence — validated on construction like `ModelConfig`.

The fields a user reaches for most have plain names at the top (`steps`, `batch_size`, ...); the
model is the nested `model` field, so `--config.model.n_layers=4` reaches any architecture knob.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from moe_jax.configs import ModelConfig
from moe_jax.data.tasks import TASKS
from moe_jax.data.template import TEMPLATES
from moe_jax.parallel.rules import parse_rules

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# Fields that only change how often things happen, not the numbers a run computes: a resumed run
# may change them without being a different experiment.
CADENCE_FIELDS = ("eval_every", "checkpoint_every", "keep_checkpoints")
# Fields that only say where the numbers live on the devices (like `--mesh`): a resumed run may
# change them too.
LAYOUT_FIELDS = ("sharding_rules",)
# Fields that no longer exist -> why; a saved `config.json` that has one still loads (and resumes).
RETIRED_FIELDS = {"log_every": "it was read by nothing: the progress line is paced by time"}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A training run on a synthetic verifiable task."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # --- the fields reached for most ---
    steps: int = 1000
    batch_size: int = 16  # global rows per step
    seq_len: int = 128
    learning_rate: float = 3e-3  # peak of the warmup-cosine schedule
    seed: int = 0  # model init and data order
    eval_every: int = 200
    checkpoint_every: int = 200
    # --- data ---
    task: str = "arithmetic"
    task_options: str = "max_digits=2"  # the task's difficulty knobs, "name=value,name=value"
    template: str = "compact"
    error_rate: float = 0.1  # fraction of training traces with a slip (an imperfect corpus)
    loss_on_prompt: bool = True  # pretraining documents: True; SFT pairs: False
    tokenizer: str = "char"  # "char" or the path of a Hugging Face tokenizer.json
    # "": the task stream above; else SFT records on disk (moe_jax.data.records): a .jsonl or
    # .array_record file, or a glob of them
    data: str = ""
    # --- optimizer (DeepSeek-V3 §4.2 shape) ---
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    microbatches: int = 1  # gradient accumulation: the batch is split into this many scans
    compute_dtype: str = "auto"  # activations; "auto" = bfloat16 on GPU/TPU, float32 on CPU
    # --- layout over the devices of --mesh ---
    sharding_rules: str = ""  # overrides of the logical-axis rules, e.g. "embed=None,mlp=fsdp+tensor"
    # --- the loop ---
    eval_batches: int = 4  # held-out batches for the eval loss (0: accuracy only)
    eval_problems: int = 64  # held-out problems for greedy task accuracy
    eval_max_new_tokens: int = 64
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        validate(self)

    def replace_model(self, **changes: Any) -> ExperimentConfig:
        """A copy with `model` fields changed (both configs re-validate)."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ExperimentConfig:
        """Inverse of `to_dict` (a workdir's `config.json`); unknown fields are an error."""
        fields = {k: v for k, v in fields.items() if k not in RETIRED_FIELDS}
        model = fields.pop("model", {})
        check_known(cls, fields)
        check_known(ModelConfig, model, prefix="model.")
        return cls(model=ModelConfig(**model), **fields)


def check_known(dataclass: type, fields: dict[str, Any], prefix: str = "") -> None:
    """Raise a ValueError naming unknown fields and listing the valid ones."""
    valid = [f.name for f in dataclasses.fields(dataclass)]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"unknown config field(s) {[prefix + u for u in unknown]}. Valid fields: "
                         + ", ".join(prefix + v for v in valid))


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value.strip()


def parse_task_options(options: str) -> dict[str, int | float | str]:
    """`"max_digits=3,ops=+"` -> `{"max_digits": 3, "ops": "+"}` (numbers become numbers)."""
    parsed: dict[str, int | float | str] = {}
    for part in filter(None, (p.strip() for p in options.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"ExperimentConfig.task_options: bad entry {part!r}. "
                             "Fix: write name=value pairs separated by commas, e.g. 'max_digits=3'")
        parsed[name.strip()] = _number_or_text(value)
    return parsed


def config_error(cfg: object, field: str, problem: str, fix: str) -> ValueError:
    """The house error: `<Config>.<field>: <problem>. Fix: <fix>`."""
    return ValueError(f"{type(cfg).__name__}.{field}: {problem}. Fix: {fix}")


def validate(cfg: ExperimentConfig) -> None:
    """Every cross-field constraint, checked before anything is built or compiled."""

    def _fail(field: str, problem: str, fix: str) -> None:
        raise config_error(cfg, field, problem, fix)

    for name in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "microbatches",
                 "eval_problems", "eval_max_new_tokens", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            _fail(name, f"must be >= 1, got {getattr(cfg, name)}", "use a positive value")
    if cfg.eval_batches < 0:
        _fail("eval_batches", f"must be >= 0, got {cfg.eval_batches}", "use 0 to skip the eval loss")
    if cfg.learning_rate <= 0:
        _fail("learning_rate", f"must be > 0, got {cfg.learning_rate}", "use e.g. 3e-3 for tiny models")
    if cfg.warmup_steps < 0:
        _fail("warmup_steps", f"must be >= 0, got {cfg.warmup_steps}", "use 0 for no warmup")
    if cfg.batch_size % cfg.microbatches:
        _fail("microbatches", f"{cfg.microbatches} does not divide batch_size={cfg.batch_size}",
              "pick a divisor of batch_size")
    if cfg.seq_len > cfg.model.max_seq_len:
        _fail("seq_len", f"{cfg.seq_len} > model.max_seq_len={cfg.model.max_seq_len}",
              "shorten seq_len or raise model.max_seq_len")
    if not 0.0 <= cfg.error_rate <= 1.0:
        _fail("error_rate", f"must lie in [0, 1], got {cfg.error_rate}", "use e.g. 0.1")
    if cfg.task not in TASKS:
        _fail("task", f"unknown task {cfg.task!r}", f"use one of {sorted(TASKS)}")
    if cfg.template not in TEMPLATES:
        _fail("template", f"unknown template {cfg.template!r}", f"use one of {sorted(TEMPLATES)}")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        _fail("compute_dtype", f"unknown {cfg.compute_dtype!r}", f"use one of {COMPUTE_DTYPES}")
    try:
        parse_rules(cfg.sharding_rules)
    except ValueError as e:
        problem, _, fix = str(e).partition(". Fix: ")
        _fail("sharding_rules", problem, fix or "use logical axes from moe_jax.parallel.DEFAULT_RULES")
    try:
        TASKS[cfg.task](**parse_task_options(cfg.task_options))
    except (TypeError, ValueError) as e:
        _fail("task_options", f"{cfg.task_options!r} is not valid for task {cfg.task!r} ({e})",
              f"use the knobs of {TASKS[cfg.task].__name__}.__init__")


def config_differences(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable `field: saved -> new` lines for every field that differs (recursively),
    skipping the cadence and layout fields a resumed run may change."""
    lines = []
    for key in sorted(set(saved) | set(new)):
        if not prefix and key in CADENCE_FIELDS + LAYOUT_FIELDS + tuple(RETIRED_FIELDS):
            continue
        old_value, new_value = saved.get(key), new.get(key)
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            lines += config_differences(old_value, new_value, prefix=f"{prefix}{key}.")
        elif old_value != new_value:
            lines.append(f"{prefix}{key}: {old_value!r} (saved) -> {new_value!r} (this command)")
    return lines
