"""The R1 pipeline's config: one tree, a part per stage (`--config.reasoning_rl.steps=…`).

What every stage must share — the model, the seed, the tasks and the template — is set once at
the top; a stage's run config is derived from its part and the top by a pure function
(`PipelineConfig.stage_run`), and those fields of a part are not its own (no flags; left out of
the tree's identity and of `pipeline.json`). Each stage's task follows from the top-level tasks:

    base            reasoning task + non-reasoning task, traces switching language at `switch_rate`
    cold_start      reasoning task (its data: `cold_start_data.examples` readable traces)
    reasoning_rl    reasoning task, rewards accuracy + format + language consistency
    rejection_sampling  fresh reasoning prompts, then the non-reasoning share mixed in
    sft             reasoning + non-reasoning (evaluated on both)
    final_rl        reasoning + non-reasoning prompts
    r1_zero         the baseline: reasoning_rl's config for the RL steps of both RL stages,
                    with R1-Zero's rewards (accuracy + format), from the base
    r1_zero_long    with `cold_start_data.source=r1_zero` only: R1-Zero for all the pipeline's RL steps
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from moe_jax.configs import ModelConfig, get_preset
from moe_jax.data.tasks import Task, make_task
from moe_jax.errors import InputError
from moe_jax.models.sampler import SamplingConfig
from moe_jax.rl.config import GRPOConfig
from moe_jax.train import config_tree
from moe_jax.train.experiment_config import (
    CorpusConfig,
    ExperimentConfig,
    LoopConfig,
    OptimizerConfig,
    RunConfig,
    check_number,
    check_positive,
    config_error,
    parse_options,
)

# The stages, in the order they run; names are fixed (flags, folders and tools address them).
STAGES = ("base", "cold_start", "reasoning_rl", "rejection_sampling", "sft", "final_rl", "r1_zero", "r1_zero_long")
RUN_STAGES = ("base", "cold_start", "reasoning_rl", "sft", "final_rl")  # the parts that are run configs
SHARED_FIELDS = ("model", "seed", "template", "tokenizer")  # a stage's, from the top (and its task and options)
DERIVED = (*SHARED_FIELDS, "task", "task_options")


COLD_START_SOURCES = ("inverse", "commuted", "r1_zero")


@dataclasses.dataclass(frozen=True)
class ColdStartData:
    """R1 §2.3.1's cold-start set: `examples` readable chains of thought, from `source`:

        inverse   synthetic traces whose check undoes the result ("check 46-34=12 ok"), a skill
                  the base never saw; `retry_rate` of them fail a first attempt and redo it
        commuted  synthetic traces whose check works the sum again in the other order, step by
                  step: the base's own skill (arithmetic only)
        r1_zero   what R1 used: the R1-Zero stage's own samples of fresh prompts, kept when the
                  verifier accepts them, they follow the template, every chain-of-thought word is
                  in the prompt's language and they end within [min_tokens, max_tokens]; one per
                  prompt, rewritten readable (one line a step, a closing summary). The `r1_zero`
                  stage then runs before `cold_start`, and `r1_zero_long` is the fair baseline.
    """

    source: str = "inverse"
    examples: int = 1000
    retry_rate: float = 0.3  # synthetic sources: the share whose first attempt fails its check and is redone
    # the r1_zero source: how R1-Zero's model is sampled (k per prompt) and the kept lengths, in tokens
    sampling: SamplingConfig = dataclasses.field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=160, samples_per_prompt=4))
    min_tokens: int = 8
    max_tokens: int = 160
    prompts_per_batch: int = 64
    max_rounds: int = 8  # rounds of fresh prompts before settling for fewer than `examples`

    def __post_init__(self) -> None:
        if self.source not in COLD_START_SOURCES:
            raise config_error(self, "source", f"unknown {self.source!r}", f"use one of {COLD_START_SOURCES}")
        check_positive(self, "examples", "max_rounds")
        check_number(self, "retry_rate", low=0, high=1, fix="use e.g. 0.3")
        try:  # the sampling fields are rejection sampling's, checked by its config
            self.rejection(1)
        except InputError as e:
            raise InputError(f"ColdStartData (its fields of the same names): {e}") from None

    def rejection(self, prompts: int) -> RejectionConfig:
        """The filters and sampler settings of the r1_zero source, for `prompts` prompts."""
        return RejectionConfig(prompts=prompts, prompts_per_batch=self.prompts_per_batch, sampling=self.sampling,
                               min_tokens=self.min_tokens, max_tokens=self.max_tokens)


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    """R1 §2.3.3: k samples per fresh prompt from the reasoning-RL checkpoint, kept only when the
    verifier accepts them, they follow the template, stay in the prompt's language, fit the length
    bounds and are no duplicate; then the non-reasoning share is mixed in."""

    prompts: int = 512
    prompts_per_batch: int = 64  # × samples_per_prompt rows decode at once (refilled as they finish)
    sampling: SamplingConfig = dataclasses.field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=160, samples_per_prompt=4))
    min_tokens: int = 8  # length bounds of a kept completion, in tokens (eos not counted)
    max_tokens: int = 160
    array_record_above: int = 100_000  # records past which an ArrayRecord copy is written beside the JSONL

    def __post_init__(self) -> None:
        check_positive(self, "prompts", "prompts_per_batch", "min_tokens", "max_tokens", "array_record_above")
        if self.min_tokens > self.max_tokens:
            raise config_error(self, "min_tokens", f"{self.min_tokens} > max_tokens={self.max_tokens}",
                               "give min_tokens <= max_tokens")
        if self.sampling.temperature <= 0:
            raise config_error(self, "sampling.temperature", "must be > 0: rejection sampling draws k different "
                               "samples", "use e.g. 1.0")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The results table's evaluation: held-out problems of every task, greedy, and pass@k."""

    problems: int = 256
    pass_k: int = 4  # samples per reasoning problem for pass@k (temperature `temperature`)
    temperature: float = 1.0
    max_new_tokens: int = 160

    def __post_init__(self) -> None:
        check_positive(self, "problems", "pass_k", "max_new_tokens")
        check_number(self, "temperature", low=0, low_open=True, fix="use e.g. 1.0")


def sft_run(config_class: type[ExperimentConfig] = ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """An SFT run on a stage's dataset (the loss on responses only), of `config_class`."""
    return config_class(**{"steps": 200, "batch_size": 32, "seq_len": 256,
                           "corpus": CorpusConfig(error_rate=0.0, loss_on_prompt=False, eval_batches=0),
                           "optimizer": OptimizerConfig(learning_rate=1e-3, warmup_steps=10),
                           "loop": LoopConfig(eval_every=100, checkpoint_every=100, eval_problems=128,
                                              eval_max_new_tokens=160), **changes})


def _rl(**changes: Any) -> GRPOConfig:
    """R1-Zero-arithmetic's GRPO with room for self-checking completions (160 new tokens)."""
    return GRPOConfig(**{"steps": 40, "batch_size": 128, "seq_len": 192,
                         "sampling": SamplingConfig(max_new_tokens=160, samples_per_prompt=8),
                         "optimizer": OptimizerConfig(learning_rate=2e-4, warmup_steps=3, weight_decay=0.0),
                         "loop": LoopConfig(eval_every=10, checkpoint_every=10, eval_problems=128,
                                            eval_max_new_tokens=160),
                         "rewards": "accuracy=1.0,format=0.1,language=0.1,language_mixed=0", **changes})


def scaled(cfg: Any, scale: float, counts: Mapping[str, int], runs: Sequence[str]) -> Any:
    """`cfg` with its sample counts (`counts`: path -> the least it may become) and its runs' steps
    (the `runs` parts': steps, the cadences and warmups that count steps, eval problems at least
    16) times `scale`, rounded up: `--scale=0.05` checks a whole graph end to end."""
    if not (math.isfinite(scale) and scale > 0):
        raise config_error(cfg, "scale", f"must be a number > 0, got {scale}", "use e.g. 0.05, or 1")
    values = config_tree.leaf_values(cfg)
    run_counts = {"steps": 1, "loop.eval_every": 1, "loop.checkpoint_every": 1, "loop.eval_problems": 16,
                  "optimizer.warmup_steps": 0}
    counts = {**counts, **{f"{run}.{path}": least for run in runs for path, least in run_counts.items()}}
    return config_tree.override(cfg, {path: max(least, math.ceil(values[path] * scale))
                                      for path, least in counts.items()})



@dataclasses.dataclass(frozen=True)
class PipelineConfig(config_tree.TreeConfig):
    """The whole R1 pipeline (defaults: the arithmetic recipe)."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: dataclasses.replace(get_preset("tiny-moe"),
                                                                                        max_seq_len=256))
    seed: int = 0
    task: str = "arithmetic"  # the reasoning task
    task_options: str = "max_digits=3,ops=+,slip=carry,languages=en+fr"
    template: str = "compact"
    tokenizer: str = "char"
    non_reasoning: str = "number_words"  # answered without a <think> block
    non_reasoning_options: str = "max_value=999,languages=en+fr"
    non_reasoning_share: float = 0.2  # of the base corpus, the rejection dataset and final RL's prompts
    switch_rate: float = 0.2  # chance a base-corpus trace word is in the other language

    # A stage's part: its own fields (the shared ones and its task come from the top: `stage_run`).
    base: ExperimentConfig = config_tree.derived_part(lambda: ExperimentConfig(
        steps=1000, batch_size=16, seq_len=128, corpus=CorpusConfig(error_rate=0.7),
        loop=LoopConfig(eval_every=1000, checkpoint_every=1000, eval_problems=128, eval_max_new_tokens=160)),
        derived=DERIVED)
    cold_start_data: ColdStartData = dataclasses.field(default_factory=ColdStartData)
    cold_start: ExperimentConfig = config_tree.derived_part(lambda: sft_run(steps=100), derived=DERIVED)
    reasoning_rl: GRPOConfig = config_tree.derived_part(_rl, derived=DERIVED)
    rejection_sampling: RejectionConfig = dataclasses.field(default_factory=RejectionConfig)
    sft: ExperimentConfig = config_tree.derived_part(sft_run, derived=DERIVED)
    final_rl: GRPOConfig = config_tree.derived_part(_rl, derived=DERIVED)
    r1_zero_rewards: str = "accuracy=1.0,format=0.1,language=0,language_mixed=0"  # R1-Zero's: no language term
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        check_number(self, "non_reasoning_share", low=0, high=1, low_open=True, fix="use e.g. 0.2")
        check_number(self, "switch_rate", low=0, high=1, fix="use e.g. 0.2, or 0 for monolingual traces")
        if "+" in self.task or self.task == self.non_reasoning:
            raise config_error(self, "task", f"{self.task!r}: the reasoning task is one task, other than "
                               f"non_reasoning={self.non_reasoning!r}", "name one reasoning task, e.g. arithmetic")
        for field in ("task_options", "non_reasoning_options"):
            options = parse_options(getattr(self, field), f"PipelineConfig.{field}")
            if "switch_rate" in options:
                raise config_error(self, field, "switch_rate is the pipeline's own field",
                                   "set --config.switch_rate instead")
        mixture, mixed_options = self.mixture()
        make_task(mixture, **parse_options(mixed_options))  # a bad option fails here, naming the field above
        source, checks = self.cold_start_data.source, make_task(self.task, **parse_options(self.task_options)).readable_checks
        if source != "r1_zero" and source not in checks:
            raise config_error(self, "cold_start_data.source", f"{source!r}: task {self.task!r} checks its readable "
                               f"solutions by {checks} only", f"use one of {(*checks, 'r1_zero')}")
        for stage in RUN_STAGES:  # every stage's run validates (it is derived again where it is used)
            self.stage_run(stage)

    def stage_run(self, stage: str) -> RunConfig:
        """Stage `stage`'s run config: its part with the top's model, seed, template, tokenizer and
        the stage's task (module docstring)."""
        mixture, mixed_options = self.mixture()
        tasks = {"base": (mixture, f"{mixed_options},switch_rate={self.switch_rate}"),
                 "cold_start": (self.task, self.task_options), "reasoning_rl": (self.task, self.task_options),
                 "sft": (mixture, mixed_options), "final_rl": (mixture, mixed_options)}
        task, options = tasks[stage]
        try:
            return dataclasses.replace(getattr(self, stage), model=self.model, seed=self.seed, template=self.template,
                                       tokenizer=self.tokenizer, task=task, task_options=options)
        except InputError as e:  # say which stage: every stage's run has the same field names
            raise InputError(f"PipelineConfig.{stage}: {e}") from None

    def non_reasoning_task(self) -> Task:
        return make_task(self.non_reasoning, **parse_options(self.non_reasoning_options))

    def mixture(self) -> tuple[str, str]:
        """(task, task_options) of the reasoning task mixed with the non-reasoning one."""
        options = [self.task_options] + [f"{self.non_reasoning}.{name}={value}" for name, value in
                                         parse_options(self.non_reasoning_options).items()]
        options.append(f"{self.non_reasoning}.share={self.non_reasoning_share}")
        return f"{self.task}+{self.non_reasoning}", ",".join(filter(None, options))

    def r1_zero(self) -> GRPOConfig:
        """The R1-Zero baseline: reasoning_rl's run for as many RL steps as both RL stages take,
        with R1-Zero's rewards."""
        steps = self.reasoning_rl.steps + self.final_rl.steps
        return dataclasses.replace(self.stage_run("reasoning_rl"), steps=steps, rewards=self.r1_zero_rewards)

    def r1_zero_long(self) -> GRPOConfig:
        """The second R1-Zero baseline when the cold start comes from R1-Zero's samples: R1-Zero
        given every RL step the pipeline takes (its R1-Zero stage's, then both RL stages'), so a
        win of the pipeline is not just more RL."""
        run = self.r1_zero()
        return dataclasses.replace(run, steps=run.steps + self.reasoning_rl.steps + self.final_rl.steps)

    def scaled(self, scale: float) -> PipelineConfig:
        """Every stage's steps and sample counts (`scaled`): `--scale=0.05` checks the whole chain
        in a minute or two."""
        return scaled(self, scale, {"cold_start_data.examples": 1, "rejection_sampling.prompts": 1,
                                    "report.problems": 16}, RUN_STAGES)
