"""Supervised fine-tuning on prompt/response pairs, the loss on the response only: the R1
pipeline's cold-start stage (clean worked solutions in the `<think>…</think><answer>…</answer>`
format), usually starting from a pretrained base.

    python experiments/pretrain.py --workdir=/tmp/base
    python experiments/sft.py --workdir=/tmp/sft --init_from=/tmp/base
    python experiments/sft.py --workdir=/tmp/sft_file --init_from=/tmp/base --config.data='traces-*.jsonl'

Without `--config.data` it reads the task stream's clean traces; with it, prompt/response records
from JSON Lines or ArrayRecord files (`moe_jax.data.records`).

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from __future__ import annotations

from absl import app

from moe_jax import config_flags, experiment_main

experiment_main.define_flags("sft")

if __name__ == "__main__":
    app.run(experiment_main.main, flags_parser=config_flags.parse_flags)
