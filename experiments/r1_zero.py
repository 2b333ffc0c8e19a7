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
from moe_jax.experiment_main import define_run_flags, run_and_report, setup_from_flags
from moe_jax.rl.config import GRPOConfig
from moe_jax.rl.trainer import train_grpo
from moe_jax.train.experiment_config import ExperimentConfig
from moe_jax.train.trainer import train

# The corpus: 1-3 digit additions whose flawed traces (70% of them) share one misconception,
# dropping every carry, so the base model has it as a competing habit (about 40% greedy
# accuracy). The RL stage: 16 prompts x 8 samples, completions up to 96 tokens.
R1_ZERO_DEFAULTS = {"task_options": "max_digits=3,ops=+,slip=carry", "error_rate": 0.7,
                    "steps": 40, "batch_size": 128, "seq_len": 128, "max_new_tokens": 96,
                    "learning_rate": 2e-4, "warmup_steps": 3, "weight_decay": 0.0, "eval_every": 10,
                    "checkpoint_every": 10, "eval_batches": 0, "eval_problems": 128,
                    "eval_max_new_tokens": 96, "log_every": 5}
# Countdown with 3 numbers in [1, 99], a search task: the base imitates the generator's solutions
# (20% of them with one operator swapped, missing the target); its greedy accuracy is low and
# sensitive to fp32 rounding (0.14 and 0.37 in two code versions: BUILD_NOTES.md).
COUNTDOWN_DEFAULTS = {**R1_ZERO_DEFAULTS, "task": "countdown", "task_options": "min_numbers=3,max_numbers=3",
                      "template": "compact", "error_rate": 0.2, "seq_len": 176, "steps": 1000,
                      "eval_every": 100, "checkpoint_every": 100, "eval_problems": 256}
RECIPES = {"arithmetic": (R1_ZERO_DEFAULTS, 1000, {}),  # (config defaults, base steps, model fields)
           "countdown": (COUNTDOWN_DEFAULTS, 3000, {"max_seq_len": 192})}

config_flags.define_config_flags(config_class=GRPOConfig)
define_run_flags()
flags.DEFINE_enum("recipe", "arithmetic", list(RECIPES), "the task and its defaults (flags override them)")
flags.DEFINE_integer("base_steps", None, "pretraining steps of the base model (default: the recipe's)")
FLAGS = flags.FLAGS


def base_config(rl: GRPOConfig, steps: int) -> ExperimentConfig:
    """The pretraining run behind `rl`: the same model, task, template and seed, on a corpus with
    `rl.error_rate` flawed traces, evaluated like the RL stage."""
    return ExperimentConfig(model=rl.model, steps=steps, task=rl.task, task_options=rl.task_options,
                            template=rl.template, seed=rl.seed, error_rate=rl.error_rate,
                            eval_every=steps, checkpoint_every=steps, eval_problems=rl.eval_problems,
                            eval_max_new_tokens=rl.eval_max_new_tokens)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.init_from:
        raise app.UsageError("r1_zero.py pretrains its own base model; to start RL from another "
                             "model use experiments/grpo.py --init_from=...")
    defaults, base_steps, model_defaults = RECIPES[FLAGS.recipe]
    rl = config_flags.config_from_flags(defaults=defaults, config_class=GRPOConfig, model_defaults=model_defaults)
    setup_from_flags()
    base_dir = os.path.join(FLAGS.workdir, "base")
    run_and_report(train, base_config(rl, FLAGS.base_steps or base_steps), base_dir, mesh_spec=FLAGS.mesh)
    run_and_report(train_grpo, rl, os.path.join(FLAGS.workdir, "grpo"), mesh_spec=FLAGS.mesh,
                   init_from=base_dir)


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
