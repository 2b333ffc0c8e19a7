"""DeepSeek-R1-Zero in miniature: pretrain a base model on imperfect worked solutions (unless the
workdir already has one), then improve it with pure RL — GRPO on rule-based rewards — and
watch the held-out greedy accuracy climb.

    python experiments/r1_zero.py --workdir=/tmp/r1_zero                   # arithmetic, ~3 min
    python experiments/r1_zero.py --workdir=/tmp/r1_cd --recipe=countdown  # ~14 min on 2 cores

`<workdir>/base` is the pretraining run and `<workdir>/grpo` the RL run; each resumes when the
command is run again. `--config.*` configures the GRPO stage (and, through `model`, `task`,
`task_options`, `template` and `seed`, the base model it starts from).
"""

from __future__ import annotations

import os

from absl import app, flags

from moe_jax import config_flags
from moe_jax.experiment_main import (
    define_run_flags,
    run_and_report,
    setup_from_flags,
    user_errors_in_one_line,
)
from moe_jax.recipes import get_recipe, r1_zero_base_config
from moe_jax.rl.config import GRPOConfig
from moe_jax.rl.trainer import train_grpo
from moe_jax.train.trainer import train

# The recipes (moe_jax.recipes): "arithmetic" is r1-zero-arithmetic, "countdown" r1-zero-countdown.
TASKS = ("arithmetic", "countdown")
config_flags.define_config_flags(config_class=GRPOConfig)
define_run_flags()
flags.DEFINE_enum("recipe", "arithmetic", [*TASKS, *(f"r1-zero-{t}" for t in TASKS)],
                  "the R1-Zero recipe: its task and defaults (--config.* flags override them)")
flags.DEFINE_integer("base_steps", None, "pretraining steps of the base model (default: the recipe's)")
flags.DEFINE_float("base_error_rate", None, "share of flawed traces in the base model's corpus "
                   "(default: the recipe's)")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.init_from:
        raise app.UsageError("r1_zero.py pretrains its own base model; to start RL from another "
                             "model use experiments/grpo.py --init_from=...")
    if FLAGS.base_steps is not None and FLAGS.base_steps < 1:
        raise app.UsageError(f"--base_steps must be >= 1, got {FLAGS.base_steps}")
    if FLAGS.base_error_rate is not None and not 0 <= FLAGS.base_error_rate <= 1:
        raise app.UsageError(f"--base_error_rate must lie in [0, 1], got {FLAGS.base_error_rate}")
    recipe = get_recipe(FLAGS.recipe if FLAGS.recipe.startswith("r1-zero-") else f"r1-zero-{FLAGS.recipe}")
    rl = config_flags.config_from_flags(defaults=dict(recipe.fields), config_class=GRPOConfig,
                                        model_defaults=dict(recipe.model_fields))
    setup_from_flags()
    base_dir = os.path.join(FLAGS.workdir, "base")
    base = r1_zero_base_config(rl, FLAGS.base_steps or recipe.base_steps,
                               recipe.base_error_rate if FLAGS.base_error_rate is None else FLAGS.base_error_rate)
    with user_errors_in_one_line():
        run_and_report(train, base, base_dir, mesh_spec=FLAGS.mesh, allow_config_change=FLAGS.allow_config_change)
        run_and_report(train_grpo, rl, os.path.join(FLAGS.workdir, "grpo"), mesh_spec=FLAGS.mesh,
                       init_from=base_dir, allow_config_change=FLAGS.allow_config_change)


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
