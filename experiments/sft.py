"""Supervised fine-tuning on prompt/response pairs, the loss on the response only: the R1
pipeline's cold-start stage (clean worked solutions in the `<think>…</think><answer>…</answer>`
format), usually starting from a pretrained base.

    python experiments/pretrain.py --workdir=/tmp/base
    python experiments/sft.py --workdir=/tmp/sft --init_from=/tmp/base

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from __future__ import annotations

from absl import app

from moe_jax import config_flags
from moe_jax.experiment_main import (
    config_from_recipe_flags,
    define_recipe_flags,
    define_run_flags,
    run_from_flags,
)

define_recipe_flags("sft")
define_run_flags()


def main(argv: list[str]) -> None:
    del argv
    run_from_flags(config_from_recipe_flags())


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
