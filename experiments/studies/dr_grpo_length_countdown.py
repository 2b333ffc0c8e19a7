"""Study 3 on countdown (see `dr_grpo_length.py`): the four objectives from a shared countdown base
(1500 pretraining steps instead of the recipe's 3000, and 100 RL steps instead of 1000, so that 3
seeds fit).

    python experiments/sweep.py --sweep=experiments/studies/dr_grpo_length_countdown.py --workdir=/tmp/study_drgrpo_cd
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the studies import each other

from dr_grpo_length import study

from moe_jax.sweep.spec import Sweep


def sweep() -> Sweep:
    return study("r1-zero-countdown", seq_len=256, base_flags=("--base_steps=1500",),
                 rl_flags=("--config.steps=100", "--config.loop.eval_every=25", "--config.loop.checkpoint_every=25"))
