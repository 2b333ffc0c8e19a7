"""What every entry point shares, so `experiments/*.py` stay a few lines: the run flags
(`--workdir`, `--mesh`, `--init_from`, the multi-process flags), one `--recipe` flag (any recipe
of the script's kind, by its name or its short name), the call into the run (`main`: the recipe's
kind of run by its config class, `moe_jax.runs`, its summary printed as one JSON line), and the
benchmarks' flags."""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import app, flags, logging

from moe_jax import config_flags, runs
from moe_jax.errors import InputError
from moe_jax.parallel.distributed import define_distributed_flags, initialize_from_flags
from moe_jax.pipeline.executor import StepIncomplete
from moe_jax.recipes import Recipe, get_recipe, recipes_for
from moe_jax.rl.health import RunHealthError
from moe_jax.train.checkpoint import CheckpointError
from moe_jax.train.experiment_config import RunConfig
from moe_jax.train.lock import WorkdirLockedError
from moe_jax.train.workdir import ConfigConflictError

COMPILATION_CACHE = "~/.cache/moe_jax/xla"  # compiled programs kept between runs (--compilation_cache)
COMPILATION_CACHE_BYTES = 2 << 30  # the oldest entries go past 2 GiB
SCRATCH = "scratch"  # --init_from=scratch: a fine-tuning recipe from a random init, on purpose
USER_ERRORS = (InputError, ConfigConflictError, WorkdirLockedError, CheckpointError, FloatingPointError,
               RunHealthError, FileNotFoundError, NotADirectoryError, StepIncomplete)
EXIT_LOCKED = 75  # the workdir is another live run's (EX_TEMPFAIL): a sweep waits for it instead of failing
# The recipe-name prefix each FlagValues' --recipe takes short names for ("r1-": --recipe=countdown).
_RECIPE_PREFIX: dict[int, str] = {}


def define_run_flags(flag_values: flags.FlagValues = flags.FLAGS, *, graph: bool = False) -> None:
    """The flags of a script that trains: one run, or (`graph`) a graph of runs, whose steps are
    redone when their config changes, so `--allow_config_change` has no use there."""
    flags.DEFINE_string("workdir", None, "directory of the run: config, checkpoints, metrics; "
                        "rerunning on the same workdir resumes", required=True, flag_values=flag_values)
    flags.DEFINE_string("mesh", None, "device mesh, e.g. 'data=2,expert=4'; unset = every device on "
                        "'data'", flag_values=flag_values)
    flags.DEFINE_string("init_from", None, "start from the weights of another run (its workdir or one "
                        "checkpoint directory) or of a Hugging Face folder (hf:<folder>); a run that "
                        "resumes from its own checkpoints keeps them (GRPO still reads it for the KL "
                        "reference)", flag_values=flag_values)
    if not graph:
        flags.DEFINE_list("allow_config_change", [], "config paths or parts (e.g. optimizer, "
                          "optimizer.learning_rate, steps) a resumed run may change from its saved config; "
                          "the run goes on from its last good checkpoint and records the change",
                          flag_values=flag_values)
    flags.DEFINE_string("compilation_cache", COMPILATION_CACHE, "folder of compiled XLA programs reused by later "
                        "runs and stages with the same programs (JAX's persistent cache; "
                        "$JAX_COMPILATION_CACHE_DIR wins); '' turns it off", flag_values=flag_values)
    define_distributed_flags(flag_values)


def define_recipe_flags(default: str, flag_values: flags.FlagValues = flags.FLAGS, *, prefix: str = "") -> None:
    """`--recipe` (the recipes of `default`'s kind of run whose names start with `prefix`, by their
    name or without the prefix) and the `--config` flags of that kind."""
    config_class = get_recipe(default).config_class
    names = [name for name in recipes_for(config_class) if name.startswith(prefix)]
    short = [name.removeprefix(prefix) for name in names] if prefix else []
    flags.DEFINE_enum("recipe", default.removeprefix(prefix), short + names, "named experiment preset "
                      "(moe_jax.recipes); --config and --config.<field> override it", flag_values=flag_values)
    config_flags.define_config_flags(flag_values=flag_values, config_class=config_class)
    _RECIPE_PREFIX[id(flag_values)] = prefix


def recipe_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Recipe:
    """The recipe `--recipe` names (a short name gets the script's prefix)."""
    name = flag_values.recipe
    prefix = _RECIPE_PREFIX.get(id(flag_values), "")
    return get_recipe(name if name.startswith(prefix) else prefix + name)


def define_flags(default_recipe: str, flag_values: flags.FlagValues = flags.FLAGS, *, prefix: str = "",
                 graph: bool = False) -> None:
    """Every flag of a training script whose recipe is `default_recipe` (`define_recipe_flags`,
    `define_run_flags`)."""
    define_recipe_flags(default_recipe, flag_values, prefix=prefix)
    define_run_flags(flag_values, graph=graph)


def define_bench_flags(warmup: int, repeats: int, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """A benchmark's `--mesh`, untimed `--warmup` and timed `--repeats` steps."""
    flags.DEFINE_string("mesh", None, "device mesh, e.g. 'data=2,expert=4'; unset = every device on 'data'",
                        flag_values=flag_values)
    flags.DEFINE_integer("warmup", warmup, "untimed steps (compilation and the first runs)", flag_values=flag_values)
    flags.DEFINE_integer("repeats", repeats, "timed steps", flag_values=flag_values)


def config_from_recipe_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Any:
    """The `--recipe`'s config under `--config` (a preset or file) and the override flags."""
    recipe = recipe_from_flags(flag_values)
    return config_flags.config_from_flags(flag_values, defaults=dict(recipe.fields),
                                          config_class=recipe.config_class,
                                          model_defaults=dict(recipe.model_fields))


class _QuietLibraries(py_logging.Filter):
    """Drop the checkpoint library's INFO chatter (a dozen lines per save) and its errors — every
    failure it has reaches the driver as an exception, which ends the run in one line naming the
    cause, while the library logs a traceback per array and thread (and asyncio one per write task
    it left behind); keep its warnings."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname:
            return record.levelno == py_logging.WARNING
        frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info and record.exc_info[2] else []
        return not any("/orbax/" in frame.filename for frame in frames)


def _quiet_failed_save_callbacks(default: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops "Event loop is closed" from asyncio callbacks: when
    one write of a background save fails, the checkpoint library closes that save's event loop and
    the other writes, finishing later, find it closed (dozens of tracebacks before the driver's one
    line); everything else goes to `default`."""

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            default(unraisable)

    return hook


def setup_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Initialise multi-process JAX if asked; the persistent compilation cache; INFO logs without
    the checkpointer's chatter."""
    initialize_from_flags(flag_values)
    cache = flag_values["compilation_cache"].value if "compilation_cache" in flag_values else ""
    if cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Runs of one architecture compile the same initialiser, evaluation and often the same
        # step: a pipeline's stages, a study's seeds, a rerun (the R1 pipeline at --scale=0.05:
        # 179 s without it, 143 s from an empty cache, 73 s from a warm one).
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    quiet_libraries()


def quiet_libraries() -> None:
    """INFO logs, without the checkpoint library's chatter and its failure reports (`_QuietLibraries`,
    `_quiet_failed_save_callbacks`): a failed save is the driver's one line."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    sys.unraisablehook = _quiet_failed_save_callbacks(sys.unraisablehook)


def run_and_report(train_fn: Callable[..., dict], cfg: RunConfig, workdir: str, **kwargs) -> dict:
    """`train_fn(cfg, workdir, **kwargs)`, its summary printed as one JSON line."""
    result = train_fn(cfg, workdir, **kwargs)
    print(json.dumps({"workdir": workdir, "status": result["status"], "step": result["step"],
                      **{k: v for k, v in result["metrics"].items() if not isinstance(v, list)}}))
    return result


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """A training script's `main` (`app.run(main, flags_parser=config_flags.parse_flags)` after
    `define_flags`): the recipe's config under the flags, run by its kind of run."""
    del argv
    cfg = config_from_recipe_flags(flag_values)
    init_from = flag_values.init_from
    if recipe_from_flags(flag_values).needs_init_from and not init_from:
        raise app.UsageError(f"--recipe={flag_values.recipe} trains a model further: give --init_from=<a run's "
                             "workdir, a checkpoint or hf:<folder>> (--init_from=scratch starts from a random "
                             "init, on purpose)")
    setup_from_flags(flag_values)
    with user_errors_in_one_line():
        run_and_report(runs.run, cfg, flag_values.workdir,
                       mesh_spec=flag_values.mesh, init_from=None if init_from == SCRATCH else init_from,
                       allow_config_change=flag_values.allow_config_change)


@contextlib.contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """Errors about what the user gave or what the run met (a bad file, a busy or conflicting
    workdir, a damaged checkpoint, a diverging run) end the script with their message and a
    non-zero exit (`EXIT_LOCKED` for a workdir another run holds), without a traceback; anything
    else is a bug and keeps its traceback."""
    try:
        yield
    except USER_ERRORS as e:
        sys.stderr.write(f"FATAL {type(e).__name__}: {e}\n")
        sys.exit(EXIT_LOCKED if isinstance(e, WorkdirLockedError) else 1)
