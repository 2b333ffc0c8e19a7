"""Pretrain a base model on a synthetic task corpus (worked solutions with occasional slips).

    python experiments/pretrain.py --workdir=/tmp/pretrain            # tiny-moe, arithmetic, CPU
    python experiments/pretrain.py --workdir=/tmp/pretrain --config.steps=2000 \
        --config.model.n_layers=4 --config.task=countdown --mesh=data=2,expert=4

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from __future__ import annotations

from absl import app

from moe_jax import config_flags, experiment_main

experiment_main.define_flags("pretrain")

if __name__ == "__main__":
    app.run(experiment_main.main, flags_parser=config_flags.parse_flags)
