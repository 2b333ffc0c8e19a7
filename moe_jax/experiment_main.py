"""What every training entry point shares: the run flags (`--workdir`, `--mesh`, `--init_from`,
`--recipe`, the multi-process flags) and the call into the loop, so `experiments/*.py` stay a
few lines."""

from __future__ import annotations

import json
import logging as py_logging
from collections.abc import Callable

from absl import flags, logging

from moe_jax import config_flags
from moe_jax.parallel.distributed import define_distributed_flags, initialize_from_flags
from moe_jax.recipes import get_recipe, recipes_for
from moe_jax.train.experiment_config import ExperimentConfig
from moe_jax.train.trainer import train


def define_run_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string("workdir", None, "directory of the run: config, checkpoints, metrics; "
                        "rerunning on the same workdir resumes", required=True, flag_values=flag_values)
    flags.DEFINE_string("mesh", None, "device mesh, e.g. 'data=2,expert=4'; unset = every device on "
                        "'data'", flag_values=flag_values)
    flags.DEFINE_string("init_from", None, "start from the weights of another run (its workdir or one "
                        "checkpoint directory) or of a Hugging Face folder (hf:<folder>); a run that "
                        "resumes from its own checkpoints keeps them (GRPO still reads it for the KL "
                        "reference)", flag_values=flag_values)
    define_distributed_flags(flag_values)


def define_recipe_flags(default: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`--recipe` (the recipes of `default`'s kind of run) and the `--config` flags of that kind."""
    config_class = get_recipe(default).config_class
    flags.DEFINE_enum("recipe", default, recipes_for(config_class), "named experiment preset "
                      "(moe_jax.recipes); --config and --config.<field> override it", flag_values=flag_values)
    config_flags.define_config_flags(flag_values=flag_values, config_class=config_class)


def config_from_recipe_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
    """The `--recipe`'s config under `--config` (a preset or file) and the override flags."""
    recipe = get_recipe(flag_values.recipe)
    return config_flags.config_from_flags(flag_values, defaults=dict(recipe.fields),
                                          config_class=recipe.config_class,
                                          model_defaults=dict(recipe.model_fields))


class _QuietLibraries(py_logging.Filter):
    """Drop INFO chatter of the checkpoint library (a dozen lines per save); keep its warnings."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def setup_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Initialise multi-process JAX if asked; INFO logs without the checkpointer's chatter."""
    initialize_from_flags(flag_values)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())


def run_and_report(train_fn: Callable[..., dict], cfg: ExperimentConfig, workdir: str, **kwargs) -> dict:
    """`train_fn(cfg, workdir, **kwargs)`, its summary printed as one JSON line."""
    result = train_fn(cfg, workdir, **kwargs)
    print(json.dumps({"workdir": workdir, "status": result["status"], "step": result["step"],
                      **{k: v for k, v in result["metrics"].items() if not isinstance(v, list)}}))
    return result


def run_from_flags(cfg: ExperimentConfig, flag_values: flags.FlagValues = flags.FLAGS, *,
                   train_fn: Callable[..., dict] = train) -> dict:
    """Set up, run `train_fn` (the pretrain/SFT loop by default, `train_grpo` for RL) on the run
    flags, and print the summary as one JSON line."""
    setup_from_flags(flag_values)
    return run_and_report(train_fn, cfg, flag_values.workdir, mesh_spec=flag_values.mesh,
                          init_from=flag_values.init_from)
