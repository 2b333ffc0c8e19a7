"""Distillation of an MoE teacher's reasoning into a small dense student (moe_jax.distill), every
step a resumable stage under one folder: teacher → traces → [top-k cache] → student, from the
student's own pretrained base; then DIR/results.md|csv|png (teacher, student base, student).

    # the teacher: an R1 pipeline's final_rl (experiments/r1_pipeline.py --workdir=/tmp/r1)
    python experiments/distill.py --workdir=/tmp/kd --config.teacher.source=/tmp/r1/final_rl
    python experiments/distill.py --workdir=/tmp/kd_logit --config.teacher.source=/tmp/r1/final_rl \
        --config.kd.mode=logit --config.kd.top_k=16 --config.kd.beta=0.5
    python experiments/distill.py --workdir=/tmp/kd --config=tiny-dense     # the larger student
    # R1's Table 6 in miniature: base, RL only, seq-KD, seq-KD + RL, logit KD, on-policy KD, teacher
    python experiments/distill.py --workdir=/tmp/t6 --study=table6 --config.teacher.source=/tmp/r1/final_rl

Without `--config.teacher.source` the R1 pipeline (`--config.pipeline.…`) is run into DIR/teacher
first. `--config.teacher.traces=/tmp/r1/rejection_sampling` trains on an existing dataset instead
of traces the teacher writes. `--config=<dense preset>` is the student; `--init_from=hf:<folder>`
replaces the student's pretraining by a Hugging Face model.
"""

from __future__ import annotations

import json
import math

from absl import app, flags

from moe_jax import config_flags
from moe_jax.distill.config import DistillConfig
from moe_jax.distill.distillation import run_distillation
from moe_jax.distill.table6 import run_table6
from moe_jax.experiment_main import define_run_flags, setup_from_flags, user_errors_in_one_line
from moe_jax.train.lock import command_workdir

config_flags.define_config_flags(default="tiny-dense-s", config_class=DistillConfig)
define_run_flags(graph=True)
flags.DEFINE_enum("study", "", ["", "table6"], "'table6': R1's Table 6 in miniature over study.sizes and "
                  "study.seeds; '': one distillation (kd.mode)")
flags.DEFINE_float("scale", 1.0, "multiplies every run's steps and the sample counts (e.g. 0.05 to check the "
                   "whole chain end to end)")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    cfg = config_flags.config_from_flags(config_class=DistillConfig, model_defaults={"max_seq_len": 256})
    setup_from_flags()
    with user_errors_in_one_line(), command_workdir(FLAGS.workdir):
        cfg = cfg.scaled(FLAGS.scale) if FLAGS.scale != 1 else cfg
        if FLAGS.study == "table6":
            if FLAGS.init_from:
                raise app.UsageError("--init_from names one student's base; the study pretrains a base per size")
            rows = run_table6(cfg, FLAGS.workdir, mesh_spec=FLAGS.mesh)
        else:
            rows = run_distillation(cfg, FLAGS.workdir, mesh_spec=FLAGS.mesh, student_init_from=FLAGS.init_from)

    def plain(value):  # JSON has no NaN or tuples
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return None if isinstance(value, float) and math.isnan(value) else value

    print(json.dumps({"workdir": FLAGS.workdir, "results": {name: {k: plain(v) for k, v in row.items()}
                                                            for name, row in rows.items()}}))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
