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

from moe_jax import config_flags, runs
from moe_jax.experiment_main import (
    config_from_recipe_flags,
    define_flags,
    recipe_from_flags,
    run_and_report,
    setup_from_flags,
    user_errors_in_one_line,
)
from moe_jax.pipeline.executor import StepIncomplete
from moe_jax.recipes import r1_zero_base_config
from moe_jax.train.lock import command_workdir

# The recipes (moe_jax.recipes): --recipe=arithmetic is r1-zero-arithmetic, countdown r1-zero-countdown.
define_flags("r1-zero-arithmetic", prefix="r1-zero-")
flags.DEFINE_integer("base_steps", None, "pretraining steps of the base model (default: the recipe's)")
flags.DEFINE_float("base_error_rate", None, "share of flawed traces in the base model's corpus "
                   "(default: the recipe's)")
flags.DEFINE_bool("base_only", False, "pretrain the base model and stop (RL runs elsewhere can start from it: "
                  "experiments/grpo.py --init_from=DIR/base)")
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
    recipe, rl = recipe_from_flags(), config_from_recipe_flags()
    setup_from_flags()
    base_dir = os.path.join(FLAGS.workdir, "base")
    base = r1_zero_base_config(rl, FLAGS.base_steps or recipe.base_steps,
                               recipe.base_error_rate if FLAGS.base_error_rate is None else FLAGS.base_error_rate)
    with user_errors_in_one_line(), command_workdir(FLAGS.workdir):
        stages = (("base", base, None), ("grpo", rl, base_dir))
        for name, cfg, init_from in stages[:1] if FLAGS.base_only else stages:
            result = run_and_report(runs.run, cfg, os.path.join(FLAGS.workdir, name), mesh_spec=FLAGS.mesh,
                                    init_from=init_from, allow_config_change=FLAGS.allow_config_change)
            if result["status"] != "finished":  # preempted: nothing may start from a half-trained model
                raise StepIncomplete(f"{name} stopped at step {result['step']} before it finished (checkpointed). "
                                     "Fix: rerun the same command; it resumes")


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
