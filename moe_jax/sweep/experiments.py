"""The experiments a sweep can run: each is a script of `experiments/` with its config class (the
fields a sweep may set), the file that says a point finished, and where its runs' metrics are."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import sys
from collections.abc import Mapping

from moe_jax.distill.config import DistillConfig
from moe_jax.pipeline.config import PipelineConfig
from moe_jax.rl.config import MEAN_LENGTH, GRPOConfig
from moe_jax.train.experiment_config import ExperimentConfig, RunConfig

SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "experiments")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """`script` (in `experiments/`) run with `--workdir=<point>` and `--config.*` flags of
    `config_class`. `runs` maps a prefix of metric names to the folder (inside the point) whose
    `metrics.jsonl` they come from ("" is the point itself); a graph experiment (`graph`) also has
    its own per-stage `results.csv`. `metrics`: what the plots draw unless asked otherwise."""

    name: str
    script: str
    config_class: type[RunConfig | PipelineConfig | DistillConfig]
    metrics: tuple[str, ...]
    runs: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"": ""})
    graph: bool = False

    @property
    def script_path(self) -> str:
        return os.path.join(SCRIPTS_DIR, self.script)

    def flag_names(self) -> frozenset[str]:
        """Every flag the script takes, as absl lists them (`--helpxml`, a few seconds: asked only
        when a sweep gives flags other than `--config.*`)."""
        return _flag_names(self.script_path)


@functools.cache
def _flag_names(script_path: str) -> frozenset[str]:
    listing = subprocess.run([sys.executable, script_path, "--helpxml"], capture_output=True, text=True, check=False,
                             timeout=300)
    return frozenset(re.findall(r"<name>([^<]+)</name>", listing.stdout))


_PIPELINE_RL = ("reasoning_rl", "final_rl", "r1_zero", "r1_zero_long")  # r1_zero_long: a cold start from R1-Zero
EXPERIMENTS: Mapping[str, Experiment] = {e.name: e for e in (
    Experiment("pretrain", "pretrain.py", ExperimentConfig, ("eval/ce", "eval/accuracy", "maxvio_mean")),
    Experiment("sft", "sft.py", ExperimentConfig, ("eval/ce", "eval/accuracy")),
    Experiment("grpo", "grpo.py", GRPOConfig, ("eval/accuracy", "reward", MEAN_LENGTH)),
    # r1_zero.py's point holds base/ (pretraining) and grpo/ (the RL run the sweep is about).
    Experiment("r1_zero", "r1_zero.py", GRPOConfig, ("eval/accuracy", "reward", MEAN_LENGTH), {"": "grpo"}),
    # Stage 2 against R1-Zero over the same steps: held-out accuracy, the sampled completions'
    # accuracy reward and length (does the cold start speed it up; does the length grow?).
    Experiment("r1_pipeline", "r1_pipeline.py", PipelineConfig,
               (*(f"{stage}/eval/accuracy" for stage in _PIPELINE_RL),
                *(f"{stage}/{m}" for m in ("rewards/accuracy/mean", MEAN_LENGTH) for stage in ("reasoning_rl", "r1_zero"))),
               {f"{stage}/": stage for stage in ("base", "cold_start", "sft", *_PIPELINE_RL)}, graph=True),
    Experiment("distill", "distill.py", DistillConfig, ("student/eval/accuracy", "student/eval/ce"),
               {"student/": "student", "student_base/": "student_base"}, graph=True),
)}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; the experiments are {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
