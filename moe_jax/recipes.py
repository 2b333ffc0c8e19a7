"""Recipes: named experiment presets that the scripts and the notebooks share, so both get the
same numbers. `get_recipe("sft").config()` is the config `experiments/sft.py` runs without
flags; every script takes `--recipe=<name>` (among the recipes of its kind of run).

    pretrain            pretraining on a synthetic task corpus (`ExperimentConfig`'s defaults)
    sft                 SFT on clean worked solutions, the loss on responses only
    grpo                GRPO from a base model (`GRPOConfig`'s defaults)
    r1-zero-arithmetic  the main job: a base with a dropped-carry habit, then GRPO (~3 min, CPU)
    r1-zero-countdown   R1-Zero on 3-number countdown (~14 min, CPU)
    r1-arithmetic       the R1 pipeline (moe_jax.pipeline) on English/French arithmetic
    r1-countdown        the R1 pipeline on English/French 3-number countdown

An R1-Zero recipe also names its base model's pretraining steps (`base_steps`); the base's config
is `r1_zero_base_config(rl_config, base_steps, base_error_rate)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from moe_jax.configs import ModelConfig, get_preset
from moe_jax.pipeline.config import PipelineConfig
from moe_jax.rl.config import GRPOConfig
from moe_jax.train import config_tree
from moe_jax.train.experiment_config import CorpusConfig, ExperimentConfig, LoopConfig, RunConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A config class and the fields that differ from its defaults (run fields by path, and
    model fields)."""

    config_class: type[RunConfig | PipelineConfig]
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    base_steps: int | None = None  # R1-Zero: pretraining steps of the base model it builds
    base_error_rate: float = 0.1  # R1-Zero: the share of flawed traces in its base's corpus
    needs_init_from: bool = False  # SFT and GRPO start from a trained model, never a random one

    def config(self, model: str | ModelConfig = "tiny-moe", overrides: Mapping[str, Any] | None = None
               ) -> RunConfig | PipelineConfig:
        """The recipe's config on a model preset (by name) or `ModelConfig`, with `overrides`
        (paths such as `"optimizer.learning_rate"`)."""
        model_cfg = get_preset(model) if isinstance(model, str) else model
        tree = config_tree.nest({**self.fields, **(overrides or {})})
        return config_tree.build(self.config_class, {
            **tree, "model": dataclasses.replace(model_cfg, **self.model_fields)})


# 1-3 digit additions whose flawed traces (70% of them) share one misconception, dropping every
# carry, so the base model has it as a competing habit (about 45% greedy accuracy). RL: 16
# prompts x 8 samples, completions up to 96 tokens.
_R1_ZERO_ARITHMETIC = {"task_options": "max_digits=3,ops=+,slip=carry", "steps": 40, "batch_size": 128,
                       "seq_len": 128, "sampling.max_new_tokens": 96, "optimizer.learning_rate": 2e-4,
                       "optimizer.warmup_steps": 3, "optimizer.weight_decay": 0.0, "loop.eval_every": 10,
                       "loop.checkpoint_every": 10, "loop.eval_problems": 128, "loop.eval_max_new_tokens": 96}
# Countdown with 3 numbers in [1, 99], a search task: the base imitates the generator's solutions
# (20% of them with one operator swapped, missing the target); its greedy accuracy is low and
# sensitive to fp32 rounding (0.14 and 0.37 in two code versions: BUILD_NOTES.md).
_R1_ZERO_COUNTDOWN = {**_R1_ZERO_ARITHMETIC, "task": "countdown", "task_options": "min_numbers=3,max_numbers=3",
                      "template": "compact", "seq_len": 176, "steps": 1000, "loop.eval_every": 100,
                      "loop.checkpoint_every": 100, "loop.eval_problems": 256}

# Countdown prompts name their numbers and target (~80 characters with the language): rows of 256.
_R1_COUNTDOWN = {"task": "countdown", "task_options": "min_numbers=3,max_numbers=3,languages=en+fr",
                 "base.steps": 3000, "base.seq_len": 192, "base.corpus.error_rate": 0.2,
                 "base.loop.eval_every": 3000, "base.loop.checkpoint_every": 3000,
                 **{f"{rl}.seq_len": 256 for rl in ("reasoning_rl", "final_rl")}}

RECIPES: Mapping[str, Recipe] = {
    "pretrain": Recipe(ExperimentConfig),
    # Curated traces (no slips), the loss on responses only, and a gentler, shorter schedule.
    "sft": Recipe(ExperimentConfig, {"corpus.loss_on_prompt": False, "corpus.error_rate": 0.0,
                                     "optimizer.learning_rate": 1e-3, "steps": 200, "optimizer.warmup_steps": 10},
                  needs_init_from=True),
    "grpo": Recipe(GRPOConfig, needs_init_from=True),
    "r1-zero-arithmetic": Recipe(GRPOConfig, _R1_ZERO_ARITHMETIC, base_steps=1000, base_error_rate=0.7),
    "r1-zero-countdown": Recipe(GRPOConfig, _R1_ZERO_COUNTDOWN, {"max_seq_len": 192}, base_steps=3000,
                                base_error_rate=0.2),
    "r1-arithmetic": Recipe(PipelineConfig, model_fields={"max_seq_len": 256}),
    "r1-countdown": Recipe(PipelineConfig, _R1_COUNTDOWN, {"max_seq_len": 256}),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipes_for(config_class: type[RunConfig]) -> list[str]:
    """The names of the recipes a script running `config_class` can take."""
    return [name for name, recipe in RECIPES.items() if recipe.config_class is config_class]


def r1_zero_base_config(rl: GRPOConfig, steps: int, error_rate: float) -> ExperimentConfig:
    """The pretraining run behind R1-Zero's `rl`: the same model, task, template and seed, on a
    corpus with `error_rate` flawed traces, evaluated like the RL stage."""
    return ExperimentConfig(model=rl.model, steps=steps, task=rl.task, task_options=rl.task_options,
                            template=rl.template, seed=rl.seed, corpus=CorpusConfig(error_rate=error_rate),
                            loop=LoopConfig(eval_every=steps, checkpoint_every=steps, eval_problems=rl.loop.eval_problems,
                                            eval_max_new_tokens=rl.loop.eval_max_new_tokens))
