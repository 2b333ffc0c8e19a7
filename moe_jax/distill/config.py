"""Distillation configs: how a student learns from a teacher (`KDConfig`), the student's KD run
(`KDRunConfig`, an SFT run with a `kd` part) and the whole distillation (`DistillConfig`: teacher,
traces, the student's base, its KD run, RL, and the Table 6 study).

The student's architecture is the top-level `model` (`--config=<dense preset>`); the tasks, the
template, the tokenizer and the base corpus are the teacher's pipeline's (`pipeline`), so the
student's base is trained on the same corpus as the teacher's base (R1's students start from
Qwen2.5/Llama *base* models). Like the pipeline's stages, a student run's config is derived from
its part and the top (`DistillConfig.stage_run`); those fields of a part are not its own.
"""

from __future__ import annotations

import dataclasses

from moe_jax.configs import ModelConfig, get_preset
from moe_jax.errors import InputError
from moe_jax.models.sampler import SamplingConfig
from moe_jax.pipeline.config import DERIVED, PipelineConfig, RejectionConfig, ReportConfig, scaled, sft_run
from moe_jax.rl.config import GRPOConfig
from moe_jax.train import config_tree
from moe_jax.train.experiment_config import (
    ExperimentConfig,
    LoopConfig,
    RunConfig,
    check_number,
    check_positive,
    config_error,
)

KD_MODES = ("sequence", "logit", "on_policy")
# The student's runs: its pretrained base, its KD run, its GRPO (RL only, and after KD).
STUDENT_RUNS = ("student_base", "student", "rl")


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """What the student matches.

    - `sequence` (what R1 did): SFT on the teacher's verified traces (cross-entropy on its tokens).
    - `logit`: GKD's generalized JSD (β, τ) between the student's and the teacher's next-token
      distributions on the traces, the teacher's side read from a top-k cache written once;
      `loss = (1 − α) · JSD + α · cross-entropy on the data`.
    - `on_policy` (GKD): as `logit`, but with probability `on_policy_rate` (λ) a step's batch is
      sampled by the student itself and scored by the teacher on the fly.
    """

    mode: str = "sequence"
    beta: float = 0.5  # 0: KL(teacher‖student), 1: KL(student‖teacher)
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the cross-entropy on the data mixed into the divergence
    top_k: int = 16  # teacher log-probs kept per token (0: the whole vocabulary)
    on_policy_rate: float = 0.5  # λ: the share of steps whose batch the student samples
    sampling: SamplingConfig = dataclasses.field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=160))

    def __post_init__(self) -> None:
        if self.mode not in KD_MODES:
            raise config_error(self, "mode", f"unknown mode {self.mode!r}", f"use one of {KD_MODES}")
        check_number(self, "beta", low=0, high=1, fix="use 0 (forward KL), 1 (reverse KL) or e.g. 0.5 (JSD)")
        check_number(self, "temperature", low=0, low_open=True, fix="use e.g. 1.0")
        check_number(self, "alpha", low=0, high=1, fix="use 0 for the divergence alone")
        check_number(self, "on_policy_rate", low=0, high=1, fix="use e.g. 0.5")
        if self.top_k < 0:
            raise config_error(self, "top_k", f"must be >= 0, got {self.top_k}", "use e.g. 16, or 0 for all")
        if self.sampling.samples_per_prompt != 1:
            raise config_error(self, "sampling.samples_per_prompt", "on-policy KD samples one completion per "
                               "prompt", "leave it at 1")

    @property
    def uses_teacher_logits(self) -> bool:
        return self.mode != "sequence"


@dataclasses.dataclass(frozen=True)
class KDRunConfig(ExperimentConfig):
    """The student's distillation run: SFT on the traces (`data`) with the `kd` objective."""

    kd: KDConfig = dataclasses.field(default_factory=KDConfig)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher and its traces come from."""

    # A run's workdir (its newest checkpoint; e.g. an R1 pipeline's DIR/final_rl) or hf:<folder>;
    # "": the distillation runs `pipeline` into DIR/teacher and uses its final_rl stage.
    source: str = ""
    # A dataset of verified traces (e.g. an R1 pipeline's rejection_sampling folder or data file);
    # "": the teacher writes them on demand, through rejection sampling's filters (`rejection`).
    traces: str = ""
    rejection: RejectionConfig = dataclasses.field(default_factory=lambda: RejectionConfig(prompts=1024))
    # Accept a `source` run that has not finished (no DONE: still training, or stopped): its latest
    # checkpoint teaches, and the teacher step's record says so. Off: such a teacher is refused.
    allow_unfinished: bool = False


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """R1's Table 6 in miniature (`--study=table6`): for each student size, the base, RL only (as
    long in wall-clock as sequence-level KD), sequence-level KD, KD then RL, logit KD and
    on-policy KD, and the teacher; `seeds` seeds for RL only and sequence-level KD."""

    sizes: str = "tiny-dense-s,tiny-dense"  # dense presets, smallest first
    seeds: int = 3
    rl_after_kd_steps: int = 40  # (d): GRPO steps after sequence-level KD

    def __post_init__(self) -> None:
        check_positive(self, "seeds", "rl_after_kd_steps")
        for name in filter(None, self.sizes.split(",")):
            preset = _preset_or_error(self, name)
            if preset.is_moe:
                raise config_error(self, "sizes", f"{name!r} is an MoE; the students are dense",
                                   "use dense presets such as tiny-dense-s,tiny-dense")

    def size_names(self) -> list[str]:
        return [name.strip() for name in self.sizes.split(",") if name.strip()]


def _preset_or_error(cfg: object, name: str) -> ModelConfig:
    try:
        return get_preset(name.strip())
    except (KeyError, ValueError) as e:
        raise config_error(cfg, "sizes", f"unknown preset {name!r} ({e})", "use dense presets, e.g. tiny-dense") from None


def _student_model() -> ModelConfig:
    return dataclasses.replace(get_preset("tiny-dense-s"), max_seq_len=256)


@dataclasses.dataclass(frozen=True)
class DistillConfig(config_tree.TreeConfig):
    """A distillation (defaults: the arithmetic R1 pipeline's teacher into `tiny-dense-s`)."""

    model: ModelConfig = dataclasses.field(default_factory=_student_model)  # the student's architecture
    seed: int = 0  # the student's (init, data order); the teacher keeps the pipeline's
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    # The student's runs: their own fields (the shared ones, their tasks and `kd` come from the top: `stage_run`).
    student_base: ExperimentConfig = config_tree.derived_part(lambda: PipelineConfig().base, derived=DERIVED)
    student: KDRunConfig = config_tree.derived_part(lambda: sft_run(KDRunConfig, steps=300), derived=(*DERIVED, "kd"))
    # R1-Zero's GRPO (the pipeline's r1_zero run); in the study, RL only stops at its wall-clock budget
    rl: GRPOConfig = config_tree.derived_part(lambda: dataclasses.replace(
        PipelineConfig().r1_zero(), steps=400, loop=LoopConfig(eval_every=100, checkpoint_every=50, eval_problems=128,
                                                               eval_max_new_tokens=160)), derived=DERIVED)
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if self.model.is_moe:
            raise config_error(self, "model", f"{self.model.name!r} is an MoE; the student is a dense model",
                               "use --config=tiny-dense-s (or another dense preset)")
        student = {name: self.stage_run(name) for name in STUDENT_RUNS}["student"]  # each validates
        if self.kd.uses_teacher_logits and self.kd.top_k > self.model.vocab_size:
            raise config_error(self, "kd.top_k", f"{self.kd.top_k} > the vocabulary ({self.model.vocab_size} ids)",
                               f"use at most {self.model.vocab_size}, or 0 for the whole vocabulary")
        if self.kd.mode == "on_policy":
            prompt_room = student.seq_len - self.kd.sampling.max_new_tokens
            if prompt_room < 8:
                raise config_error(self, "kd.sampling.max_new_tokens", f"{self.kd.sampling.max_new_tokens} leaves "
                                   f"{prompt_room} of student.seq_len={student.seq_len} for the prompt",
                                   "lower it, or raise student.seq_len")

    def stage_run(self, name: str) -> RunConfig:
        """The run config of the student's run `name` (`STUDENT_RUNS`): its part with the student's
        model and seed, the pipeline's template and tokenizer, the task of the pipeline stage it
        mirrors (base corpus, SFT mixture, reasoning RL) and, for the KD run, `kd`."""
        p = self.pipeline
        stage = p.stage_run({"student_base": "base", "student": "sft", "rl": "reasoning_rl"}[name])
        changes = {"model": self.model, "seed": self.seed, "template": p.template, "tokenizer": p.tokenizer,
                   "task": stage.task, "task_options": stage.task_options}
        try:
            return dataclasses.replace(getattr(self, name), **changes, **({"kd": self.kd} if name == "student" else {}))
        except InputError as e:
            raise InputError(f"DistillConfig.{name}: {e}") from None

    def scaled(self, scale: float) -> DistillConfig:
        """Every run's steps (with their cadences and warmups), the traces' prompts and the report's
        problems times `scale` (`moe_jax.pipeline.config.scaled`), and the pipeline's when it trains
        the teacher here: `--scale=0.05` checks the whole chain end to end."""
        small = scaled(self, scale, {"teacher.rejection.prompts": 1, "report.problems": 16,
                                     "study.rl_after_kd_steps": 1}, STUDENT_RUNS)
        return small if self.teacher.source else dataclasses.replace(small, pipeline=self.pipeline.scaled(scale))
