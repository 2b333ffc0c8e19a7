"""DeepSeek-R1's pipeline in miniature (R1 §2.3), every stage a resumable run under one folder:
base → cold_start → reasoning_rl → rejection_sampling → sft (of the base) → final_rl, and the
R1-Zero baseline (GRPO from the base for as many RL steps); then DIR/results.md|csv|png.

    python experiments/r1_pipeline.py --workdir=/tmp/r1                    # arithmetic
    python experiments/r1_pipeline.py --workdir=/tmp/r1s --scale=0.05      # the whole chain, ~2 min
    python experiments/r1_pipeline.py --workdir=/tmp/r1cd --recipe=countdown
    python experiments/r1_pipeline.py --workdir=/tmp/r1 --config.reasoning_rl.steps=60   # redoes
        reasoning_rl and what follows it; base and cold_start are skipped

A finished stage is skipped, an interrupted one resumes, a changed one (its config or an input's)
is moved to DIR/superseded/ and redone with everything downstream of it.
"""

from __future__ import annotations

import json
import math

from absl import app, flags

from moe_jax import config_flags
from moe_jax.experiment_main import (
    config_from_recipe_flags,
    define_flags,
    setup_from_flags,
    user_errors_in_one_line,
)
from moe_jax.pipeline.config import STAGES
from moe_jax.pipeline.r1 import run_pipeline
from moe_jax.train.lock import command_workdir

# The recipes (moe_jax.recipes): --recipe=arithmetic is r1-arithmetic, countdown r1-countdown.
define_flags("r1-arithmetic", prefix="r1-", graph=True)
flags.DEFINE_float("scale", 1.0, "multiplies every stage's steps and sample counts (e.g. 0.05 to check the "
                   "whole chain end to end in a minute or two)")
flags.DEFINE_list("only", [], "stop once these stages (and what they read) are done, without the results table: "
                  "e.g. --only=base makes a base that other pipelines start from with --init_from=DIR/base")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    cfg = config_from_recipe_flags()
    unknown = sorted(set(FLAGS.only) - set(STAGES))
    if unknown:
        raise app.UsageError(f"--only={','.join(FLAGS.only)}: no stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    setup_from_flags()
    with user_errors_in_one_line(), command_workdir(FLAGS.workdir):
        rows = run_pipeline(cfg.scaled(FLAGS.scale) if FLAGS.scale != 1 else cfg, FLAGS.workdir,
                            mesh_spec=FLAGS.mesh, init_from=FLAGS.init_from, only=FLAGS.only)
    rows = {stage: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for stage, row in rows.items()}  # JSON has no NaN (a length with no answers to average)
    print(json.dumps({"workdir": FLAGS.workdir, "results": rows}))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
