"""Sum up R1 pipeline folders run with different `--config.seed`: every results column as mean ±
std, and stage 2's convergence and completion length against the R1-Zero baseline.

    for s in 0 1 2; do python experiments/r1_pipeline.py --workdir=/tmp/r1_s$s --config.seed=$s; done
    python experiments/r1_seeds.py --workdirs=/tmp/r1_s0,/tmp/r1_s1,/tmp/r1_s2
"""

from __future__ import annotations

from absl import app, flags

from moe_jax.pipeline.seeds import summary

flags.DEFINE_list("workdirs", None, "finished pipeline folders (each has results.csv)", required=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    print(summary(FLAGS.workdirs))


if __name__ == "__main__":
    app.run(main)
