"""Run configs, built by composition and validated on construction like `ModelConfig`.

A run config holds what every run has — the model (`--config.model.<field>`), `steps`,
`batch_size`, `seq_len`, `seed`, the task, the tokenizer, the layout — and nested parts:
`optimizer` (`OptimizerConfig`) and `loop` (`LoopConfig`) for every run, `corpus`
(`CorpusConfig`) for a language-model run (`ExperimentConfig`: pretraining and SFT), and GRPO's
own parts in `moe_jax.rl.config`. A part validates its own fields; the run checks what crosses
them. `override(cfg, {"optimizer.learning_rate": 1e-3})` changes fields by path.

A `config.json` saved before a field moved into a part still loads: `MOVED_FIELDS` maps the old
flat names to their paths (the flag layer names the new path too), and `RETIRED_FIELDS` are
dropped with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from moe_jax.configs import ModelConfig
from moe_jax.data.tasks import TASKS, Task, make_task
from moe_jax.data.template import TEMPLATES
from moe_jax.errors import InputError
from moe_jax.parallel.rules import parse_rules
from moe_jax.train import config_tree

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
_CADENCE = "how often the run evaluates or saves, not the numbers it computes"


def config_error(cfg: object, field: str, problem: str, fix: str) -> InputError:
    """The house error: `<Config>.<field>: <problem>. Fix: <fix>`."""
    return InputError(f"{type(cfg).__name__}.{field}: {problem}. Fix: {fix}")


def check_number(cfg: object, field: str, *, low: float, high: float = math.inf, low_open: bool = False,
                 fix: str) -> None:
    """`field` is a finite number in [low, high] (or (low, high] when `low_open`)."""
    value = getattr(cfg, field)
    inside = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not inside:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise config_error(cfg, field, f"must be a finite number in {interval}, got {value}", fix)


def check_positive(cfg: object, *fields: str) -> None:
    for field in fields:
        if getattr(cfg, field) < 1:
            raise config_error(cfg, field, f"must be >= 1, got {getattr(cfg, field)}", "use a positive value")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay, global-norm clipping (DeepSeek-V3 §4.2 shape)."""

    learning_rate: float = 3e-3  # peak of the warmup-cosine schedule
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        check_number(self, "learning_rate", low=0, low_open=True, fix="use e.g. 3e-3 for tiny models")
        check_number(self, "weight_decay", low=0, fix="use e.g. 0.1, or 0 for none")
        check_number(self, "clip_norm", low=0, low_open=True, fix="use e.g. 1.0")
        if self.warmup_steps < 0:
            raise config_error(self, "warmup_steps", f"must be >= 0, got {self.warmup_steps}", "use 0 for no warmup")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How often the loop evaluates and saves, and what its evaluation samples."""

    eval_every: int = config_tree.not_identity(200, why=_CADENCE)
    checkpoint_every: int = config_tree.not_identity(200, why=_CADENCE)
    keep_checkpoints: int = config_tree.not_identity(3, why="how many checkpoints stay on disk")
    eval_problems: int = 64  # held-out problems for greedy task accuracy
    eval_max_new_tokens: int = 64
    # A wall-clock budget: the run ends (saved, DONE) after the step during which its wall time,
    # every attempt's setup, steps and evaluations together, reaches it. 0: no budget.
    max_seconds: float = config_tree.not_identity(0.0, why="a budget: when the run stops, not what a step computes")

    def __post_init__(self) -> None:
        check_positive(self, "eval_every", "checkpoint_every", "keep_checkpoints", "eval_problems",
                       "eval_max_new_tokens")
        check_number(self, "max_seconds", low=0, fix="use a number of seconds, or 0 for no budget")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """How a language-model run's documents are made from the task stream (or dataset records)."""

    error_rate: float = 0.1  # fraction of training traces with a slip (an imperfect corpus)
    loss_on_prompt: bool = True  # pretraining documents: True; SFT pairs: False
    eval_batches: int = 4  # held-out batches for the eval loss (0: accuracy only)

    def __post_init__(self) -> None:
        check_number(self, "error_rate", low=0, high=1, fix="use e.g. 0.1")
        if self.eval_batches < 0:
            raise config_error(self, "eval_batches", f"must be >= 0, got {self.eval_batches}",
                               "use 0 to skip the eval loss")


@dataclasses.dataclass(frozen=True)
class RunConfig(config_tree.TreeConfig):
    """What every kind of run has; the kinds (`ExperimentConfig`, `GRPOConfig`, ...) add parts.
    `to_dict` / `to_json` / `from_dict` (a workdir's `config.json`, today's or an older one) are
    `config_tree.TreeConfig`'s."""

    # Old flat field -> its path now (a saved config.json or a flag may still use the old name).
    MOVED_FIELDS: ClassVar[Mapping[str, str]] = {
        **{name: f"optimizer.{name}" for name in ("learning_rate", "warmup_steps", "weight_decay", "clip_norm")},
        **{name: f"loop.{name}" for name in ("eval_every", "checkpoint_every", "keep_checkpoints",
                                              "eval_problems", "eval_max_new_tokens")}}
    # Fields that no longer exist -> why; a saved `config.json` that has one still loads.
    RETIRED_FIELDS: ClassVar[Mapping[str, str]] = {
        "log_every": "it was read by nothing: the progress line is paced by time"}

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    steps: int = 1000
    batch_size: int = 16  # global rows per step
    seq_len: int = 128
    seed: int = 0  # model init and data order
    task: str = "arithmetic"
    task_options: str = "max_digits=2"  # the task's difficulty knobs, "name=value,name=value"
    template: str = "compact"
    tokenizer: str = "char"  # "char" or the path of a Hugging Face tokenizer.json
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    microbatches: int = 1  # gradient accumulation: the batch is split into this many scans
    compute_dtype: str = "auto"  # activations; "auto" = bfloat16 on GPU/TPU, float32 on CPU
    # overrides of the logical-axis rules, e.g. "embed=None,mlp=fsdp+tensor"
    sharding_rules: str = config_tree.not_identity("", why="where the numbers live on the devices (like --mesh)")

    def __post_init__(self) -> None:
        validate_run(self)

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates one step makes (GRPO: μ × minibatches); the schedule counts updates."""
        return 1

    def tokens_processed(self, metrics: Sequence[Mapping[str, Any]]) -> int:
        """Tokens the run trained on, given its `metrics.jsonl` records: rows × seq_len per step."""
        del metrics
        return self.steps * self.batch_size * self.seq_len

    def replace_model(self, **changes: Any) -> RunConfig:
        """A copy with `model` fields changed (both configs re-validate)."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))



@dataclasses.dataclass(frozen=True)
class ExperimentConfig(RunConfig):
    """A language-model run (pretraining or SFT) on a synthetic task or on dataset records."""

    MOVED_FIELDS: ClassVar[Mapping[str, str]] = {
        **RunConfig.MOVED_FIELDS,
        **{name: f"corpus.{name}" for name in ("error_rate", "loss_on_prompt", "eval_batches")}}

    # "": the task stream; else SFT records on disk (moe_jax.data.records): a .jsonl or
    # .array_record file, or a glob of them
    data: str = ""
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)


def run_task(run: RunConfig) -> Task:
    """The task a run trains and evaluates on (its `task` with its `task_options`)."""
    options = parse_options(run.task_options)
    return make_task(run.task, **options)


def require_class(cfg: RunConfig, cls: type[RunConfig], runner: str) -> None:
    """A runner trains its own config class, not a subclass that carries other parts (a
    `KDRunConfig` handed to `train` would silently lose its `kd` objective)."""
    if type(cfg) is not cls:
        raise InputError(f"{runner} trains a {cls.__name__}, not a {type(cfg).__name__}. Fix: use the runner of "
                         f"{type(cfg).__name__} (moe_jax.runs.runner_for)")


def parse_options(options: str, field: str = "ExperimentConfig.task_options") -> dict[str, int | float | str]:
    """`"max_digits=3,ops=+"` -> `{"max_digits": 3, "ops": "+"}` (numbers become numbers)."""
    parsed: dict[str, int | float | str] = {}
    for part in filter(None, (p.strip() for p in options.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{field}: bad entry {part!r}. "
                             "Fix: write name=value pairs separated by commas, e.g. 'max_digits=3'")
        parsed[name.strip()] = _number_or_text(value)
    return parsed


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value.strip()


def validate_run(cfg: RunConfig) -> None:
    """Every constraint across a run's fields and parts, checked before anything is built."""

    def _fail(field: str, problem: str, fix: str) -> None:
        raise config_error(cfg, field, problem, fix)

    for path, value in config_tree.leaf_values(cfg).items():  # every number of the tree, the model's too
        if isinstance(value, float) and not math.isfinite(value):
            _fail(path, f"must be a finite number, got {value}", "give a finite value")
    check_positive(cfg, "steps", "batch_size", "seq_len", "microbatches")
    if cfg.batch_size % cfg.microbatches:
        _fail("microbatches", f"{cfg.microbatches} does not divide batch_size={cfg.batch_size}",
              "pick a divisor of batch_size")
    if cfg.seq_len > cfg.model.max_seq_len:
        _fail("seq_len", f"{cfg.seq_len} > model.max_seq_len={cfg.model.max_seq_len}",
              "shorten seq_len or raise model.max_seq_len")
    if cfg.template not in TEMPLATES:
        _fail("template", f"unknown template {cfg.template!r}", f"use one of {sorted(TEMPLATES)}")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        _fail("compute_dtype", f"unknown {cfg.compute_dtype!r}", f"use one of {COMPUTE_DTYPES}")
    try:
        parse_rules(cfg.sharding_rules)
    except ValueError as e:
        problem, _, fix = str(e).partition(". Fix: ")
        _fail("sharding_rules", problem, fix or "use logical axes from moe_jax.parallel.DEFAULT_RULES")
    task_names = cfg.task.split("+")
    if any(name not in TASKS for name in task_names):
        _fail("task", f"unknown task {cfg.task!r}", f"use one of {sorted(TASKS)}, or several joined by '+'")
    try:
        run_task(cfg)
    except (TypeError, ValueError) as e:
        _fail("task_options", f"{cfg.task_options!r} is not valid for task {cfg.task!r} ({e})",
              "use the knobs of " + ", ".join(f"{TASKS[name].__name__}.__init__" for name in task_names))


def config_differences(saved: Mapping[str, Any], new: RunConfig) -> list[str]:
    """Human-readable `path: saved -> new` lines for every field that differs, but those outside
    the run's identity (`config_tree.not_identity`: cadence, layout, budgets), which a resumed run
    may change."""
    return config_tree.differences(saved, new.to_dict(), skip=tuple(config_tree.non_identity_paths(new)))
