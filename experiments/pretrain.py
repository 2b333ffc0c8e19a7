"""Pretrain a base model on a synthetic task corpus (worked solutions with occasional slips).

    python experiments/pretrain.py --workdir=/tmp/pretrain            # tiny-moe, arithmetic, CPU
    python experiments/pretrain.py --workdir=/tmp/pretrain --config.steps=2000 \
        --config.model.n_layers=4 --config.task=countdown --mesh=data=2,expert=4

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

define_recipe_flags("pretrain")
define_run_flags()


def main(argv: list[str]) -> None:
    del argv
    run_from_flags(config_from_recipe_flags())


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
