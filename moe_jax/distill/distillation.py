"""Distillation as a graph of stages under one folder (`moe_jax.pipeline.stages`: each keyed by
its config and its inputs' keys, skipped when done, resumed when interrupted, redone with what
depends on it when changed):

    teacher ─► traces ─► topk ─┐            (topk: logit and on-policy KD only)
                   └──────────►├─► student
    student_base ──────────────┘

- `teacher`: `teacher.source` (a run's workdir or `hf:<folder>`) recorded with its `DONE`, or,
  when empty, the R1 pipeline `pipeline` run into `DIR/teacher/`, whose `final_rl` teaches.
- `traces`: the teacher's verified traces — `teacher.traces` (a dataset) or written on demand by
  rejection sampling's filters from fresh prompts (none of any eval set's or RL's).
- `topk`: the teacher's top-k log-probs over every trace, written once (`write_topk_cache`).
- `student_base`: the student pretrained on the teacher's base corpus (or `hf:<folder>`).
- `student`: its KD run (`kd.mode`) from its base.

`run_distillation(cfg, DIR)` then measures the teacher, the student's base and the student on the
R1 pipeline's held-out set into `DIR/results.md|csv|png`. `moe_jax.distill.table6` reuses these
stages for R1's Table 6.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging

from moe_jax.configs import count_params
from moe_jax.data.tasks import Task, make_task
from moe_jax.data.tokenizer import load_tokenizer
from moe_jax.distill.config import DistillConfig, KDRunConfig
from moe_jax.distill.run import train_kd
from moe_jax.distill.teacher import load_teacher, write_topk_cache
from moe_jax.errors import InputError
from moe_jax.parallel import make_mesh, parse_rules
from moe_jax.pipeline import datasets, report
from moe_jax.pipeline.r1 import run_pipeline, seen_problems, write_rejection_dataset
from moe_jax.pipeline.stages import Stage, is_lead, run_stages, stage_key, stage_seconds
from moe_jax.rl.config import GRPOConfig
from moe_jax.rl.trainer import train_grpo
from moe_jax.train import workdir as workdir_format
from moe_jax.train.context import load_model
from moe_jax.train.evaluation import heldout_seed
from moe_jax.train.experiment_config import RunConfig, parse_options
from moe_jax.train.trainer import train

TRACES_OFFSET = 5_000_011  # the teacher's trace prompts: stream pipeline.seed + this (no other stage's)
TEACHER_STAGE = "final_rl"  # the pipeline stage that teaches when the distillation runs its own pipeline


def run_task(run: RunConfig) -> Task:
    return make_task(run.task, **parse_options(run.task_options))


@dataclasses.dataclass
class Distillation:
    """The stages of one distillation folder (module docstring)."""

    cfg: DistillConfig
    workdir: str
    mesh_spec: str | None = None
    student_init_from: str | None = None  # hf:<folder> (or a run) as the student's base, instead of pretraining
    allow_config_change: Sequence[str] = ()

    def path(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)

    @property
    def teacher_source(self) -> str:
        return self.cfg.teacher.source or os.path.join(self.path("teacher"), TEACHER_STAGE)

    @property
    def traces_data(self) -> str:
        traces = self.cfg.teacher.traces or self.path("traces")
        return datasets.dataset_path(traces) if os.path.isdir(traces) else traces

    def _mesh(self) -> jax.sharding.Mesh:
        return make_mesh(self.mesh_spec or "auto")

    # The stages every distillation shares.
    def teacher_stage(self) -> Stage:
        source = self.cfg.teacher.source
        if not source:
            def run_teacher(stage_dir: str, inputs: Mapping[str, str]) -> None:
                run_pipeline(self.cfg.pipeline, stage_dir, mesh_spec=self.mesh_spec, only=(TEACHER_STAGE,))
                if is_lead():
                    workdir_format.mark_done(stage_dir, 0, {"teacher": self.teacher_source})

            return Stage("teacher", (), {"pipeline": self.cfg.pipeline.to_dict()}, run_teacher)
        local = source.removeprefix("hf:")
        if not os.path.exists(local):
            raise InputError(f"DistillConfig.teacher.source: {source} does not exist. Fix: give a run's workdir "
                             "(e.g. an R1 pipeline's DIR/final_rl) or hf:<folder>")
        done = workdir_format.read_done(local)  # a retrained teacher changes the key
        settings = {"source": os.path.abspath(local), "hf": source.startswith("hf:"),
                    "finished": done and [done["step"], done["finished_at"]]}

        def record(stage_dir: str, inputs: Mapping[str, str]) -> None:
            if is_lead():
                workdir_format.mark_done(stage_dir, 0, {"teacher": source})

        return Stage("teacher", (), settings, record)

    def traces_stage(self) -> Stage:
        given = self.cfg.teacher.traces
        if given:
            if not os.path.exists(given):
                raise InputError(f"DistillConfig.teacher.traces: {given} does not exist. Fix: give a dataset file "
                                 "or folder (e.g. an R1 pipeline's DIR/rejection_sampling), or leave it empty")
            data = self.traces_data
            settings = {"traces": os.path.abspath(data), "bytes": os.path.getsize(data),
                        "modified": os.path.getmtime(data)}

            def record(stage_dir: str, inputs: Mapping[str, str]) -> None:
                if is_lead():
                    workdir_format.mark_done(stage_dir, 0, {"traces": data})

            return Stage("traces", ("teacher",), settings, record)
        cfg = self.cfg
        settings = {"rejection": dataclasses.asdict(cfg.teacher.rejection), "seed": cfg.pipeline.seed,
                    "tasks": [cfg.pipeline.task, cfg.pipeline.task_options, cfg.pipeline.non_reasoning,
                              cfg.pipeline.non_reasoning_options, cfg.pipeline.non_reasoning_share],
                    "template": cfg.pipeline.template, "excluded": stage_key({"seen": sorted(self.excluded())}, [])}
        return Stage("traces", ("teacher",), settings, self._write_traces)

    def excluded(self) -> set[str]:
        """Problems the traces must not pose: the pipeline's eval sets and RL prompts, and the
        held-out sets the student's runs evaluate on, for every seed the study uses."""
        cfg = self.cfg
        seen = seen_problems(cfg.pipeline)
        for offset in range(cfg.study.seeds):
            for run in (cfg.student_base, cfg.student, cfg.rl):
                seen |= {datasets.problem_identity(p) for p in
                         report.heldout_problems(run_task(run), run.seed + offset, run.loop.eval_problems)}
        return seen

    def _write_traces(self, stage_dir: str, inputs: Mapping[str, str]) -> None:
        cfg, mesh = self.cfg, self._mesh()
        teacher = load_teacher(self.teacher_source, mesh)
        write_rejection_dataset(stage_dir, teacher.model, teacher.tokenizer, cfg.pipeline, cfg.teacher.rejection,
                                seed=cfg.pipeline.seed + TRACES_OFFSET, excluded=self.excluded(), mesh=mesh)

    def topk_stage(self) -> Stage:
        kd, seq_len = self.cfg.kd, self.cfg.student.seq_len

        def write(stage_dir: str, inputs: Mapping[str, str]) -> None:
            mesh = self._mesh()
            info = write_topk_cache(load_teacher(self.teacher_source, mesh), self.traces_data, stage_dir, k=kd.top_k,
                                    seq_len=seq_len, mesh=mesh)
            if is_lead():
                workdir_format.mark_done(stage_dir, 0, info)

        return Stage("topk", ("teacher", "traces"), {"k": kd.top_k, "seq_len": seq_len}, write)

    # The student's stages.
    def base_stage(self, name: str, run: RunConfig) -> Stage:
        if self.student_init_from:
            def record(stage_dir: str, inputs: Mapping[str, str]) -> None:
                if is_lead():
                    workdir_format.mark_done(stage_dir, 0, {"init_from": self.student_init_from})

            return Stage(name, (), {"init_from": self.student_init_from}, record)
        return Stage(name, (), {"run": run.to_dict()},
                     lambda stage_dir, inputs: train(run, stage_dir, mesh_spec=self.mesh_spec,
                                                     allow_config_change=self.allow_config_change))

    def base_source(self, base_stage: str) -> str:
        return self.student_init_from or self.path(base_stage)

    def kd_stage(self, name: str, base: str, run: KDRunConfig) -> Stage:
        """The student's KD run from the base stage `base` on the traces."""
        uses_logits = run.kd.uses_teacher_logits
        inputs = ("teacher", "traces", base, *(("topk",) if uses_logits else ()))

        def distill(stage_dir: str, inputs: Mapping[str, str]) -> None:
            teacher = load_teacher(self.teacher_source, self._mesh()) if uses_logits else None
            train_kd(dataclasses.replace(run, data=self.traces_data), stage_dir, teacher=teacher,
                     cache=self.path("topk") if uses_logits else None, mesh_spec=self.mesh_spec,
                     init_from=self.base_source(base), allow_config_change=self.allow_config_change)

        return Stage(name, inputs, {"run": run.to_dict()}, distill)

    def rl_stage(self, name: str, start: str, run: GRPOConfig) -> Stage:
        """GRPO (R1-Zero's rewards) from the model of stage `start`."""
        source = self.base_source(start) if start.endswith("base") else self.path(start)
        return Stage(name, (start,), {"run": run.to_dict()},
                     lambda stage_dir, inputs: train_grpo(run, stage_dir, mesh_spec=self.mesh_spec, init_from=source,
                                                          allow_config_change=self.allow_config_change))

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        logits = [self.topk_stage()] if cfg.kd.uses_teacher_logits else []
        return [self.teacher_stage(), self.traces_stage(), *logits, self.base_stage("student_base", cfg.student_base),
                self.kd_stage("student", "student_base", cfg.student)]

    # Measuring.
    def measure(self, stage: str, keys: Mapping[str, str], model_source: str, run: RunConfig | None = None
                ) -> dict[str, Any]:
        """The results-table columns of the model `model_source` (the teacher when `run` is None),
        measured once per stage key on the pipeline's held-out problems."""
        cfg = self.cfg
        task = run_task(cfg.pipeline.final_rl)
        problems = report.heldout_problems(task, cfg.pipeline.seed, cfg.report.problems)
        stage_dir = self.path(stage)

        def measure_model() -> dict[str, float]:
            mesh = self._mesh()
            if run is None:
                teacher = load_teacher(model_source, mesh)
                model, tokenizer = teacher.model, teacher.tokenizer
            else:
                model = load_model(run.model, model_source, mesh, parse_rules(run.sharding_rules), run.compute_dtype)
                tokenizer = load_tokenizer(workdir_format.tokenizer_path(stage_dir, run))
            measures = report.measure(model, task, problems, cfg.report, tokenizer=tokenizer,
                                      template=cfg.pipeline.template, key=jax.random.key(heldout_seed(cfg.pipeline.seed)),
                                      mesh=mesh)
            return {**measures, "params": count_params(model.cfg)["total"]}

        settings = stage_key(dataclasses.asdict(cfg.report), [])
        return {**report.cached_measures(stage_dir, [keys[stage], settings], measure_model),
                "wall_s": stage_seconds(stage_dir)}

    def columns(self) -> list[str]:
        p, k = self.cfg.pipeline, self.cfg.report.pass_k
        return ["stage", f"accuracy/{p.task}", f"pass@{k}", "format", "language", "language_mixed", "length_correct",
                "length_incorrect", f"accuracy/{p.non_reasoning}", "params", "wall_s"]


def run_distillation(cfg: DistillConfig, workdir: str, *, mesh_spec: str | None = None,
                     student_init_from: str | None = None, allow_config_change: Sequence[str] = (),
                     only: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run, resume or skip every stage into `workdir/<stage>/`, then write the results table of the
    teacher, the student's base and the student (when every stage ran)."""
    distillation = Distillation(cfg, workdir, mesh_spec, student_init_from, allow_config_change)
    keys = run_stages(workdir, distillation.stages(), only=only)
    if only:
        return {}
    rows = {"teacher": distillation.measure("teacher", keys, distillation.teacher_source),
            "student_base": distillation.measure("student_base", keys, distillation.base_source("student_base"),
                                                 cfg.student_base),
            f"student ({cfg.kd.mode} KD)": distillation.measure("student", keys, distillation.path("student"),
                                                                 cfg.student)}
    rows["teacher"]["wall_s"] = None  # trained elsewhere (or by the pipeline, whose table has its times)
    if is_lead():
        report.write_results(workdir, rows, distillation.columns(),
                             f"Distillation of {distillation.teacher_source} into {cfg.model.name} (seed {cfg.seed})")
    logging.info("results: %s", os.path.join(workdir, report.RESULTS_MD))
    return rows

