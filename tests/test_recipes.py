"""Recipes: a script without flags and a notebook calling `get_recipe(name).config()` get the same
config; GRPO's config class carries GRPO's defaults."""

import pytest
from absl import flags

from moe_jax.configs import get_preset
from moe_jax.experiment_main import config_from_recipe_flags, define_recipe_flags
from moe_jax.pipeline.config import PipelineConfig
from moe_jax.recipes import RECIPES, get_recipe, r1_zero_base_config, recipes_for
from moe_jax.rl.config import GRPOConfig
from moe_jax.train.experiment_config import ExperimentConfig


def _flags(default_recipe: str, argv: list[str]) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    define_recipe_flags(default_recipe, flag_values=flag_values)
    flag_values(["prog", *argv])
    return flag_values


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_command_line_and_the_library_build_the_same_config(name):
    script_default = {ExperimentConfig: "pretrain", GRPOConfig: "grpo", PipelineConfig: "r1-arithmetic"}[
        RECIPES[name].config_class]
    assert config_from_recipe_flags(_flags(script_default, [f"--recipe={name}"])) == get_recipe(name).config()


def test_flags_override_a_recipe():
    cfg = config_from_recipe_flags(_flags("grpo", ["--recipe=r1-zero-countdown", "--config.steps=7",
                                                   "--config.model.n_layers=1"]))
    assert (cfg.steps, cfg.model.n_layers, cfg.task, cfg.model.max_seq_len) == (7, 1, "countdown", 192)


def test_a_notebook_grpo_config_has_grpo_defaults_not_pretraining_ones():
    assert GRPOConfig(model=get_preset("tiny-moe")) == get_recipe("grpo").config()
    rl, pretraining = GRPOConfig(), ExperimentConfig()
    assert (rl.optimizer.learning_rate, rl.batch_size, rl.steps, rl.loop.eval_every) == (1e-4, 128, 100, 20)
    assert (pretraining.optimizer.learning_rate, pretraining.batch_size) == (3e-3, 16)


def test_sft_recipe_puts_the_loss_on_responses_of_clean_traces():
    sft = get_recipe("sft").config()
    assert (sft.corpus.loss_on_prompt, sft.corpus.error_rate, sft.optimizer.learning_rate) == (False, 0.0, 1e-3)


def test_r1_zero_base_shares_the_rl_task_and_model():
    recipe = get_recipe("r1-zero-countdown")
    rl = recipe.config()
    base = r1_zero_base_config(rl, recipe.base_steps, recipe.base_error_rate)
    assert (base.model, base.task, base.task_options, base.seed, base.steps, base.corpus.error_rate) == (
        rl.model, rl.task, rl.task_options, rl.seed, 3000, 0.2)
    assert recipes_for(GRPOConfig) == ["grpo", "r1-zero-arithmetic", "r1-zero-countdown"]
    with pytest.raises(KeyError, match="known recipes: pretrain, sft"):
        get_recipe("r1")
