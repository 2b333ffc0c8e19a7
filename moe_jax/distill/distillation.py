"""Distillation as a graph of steps under one folder (`moe_jax.pipeline.executor`: each keyed by
its config's identity and its inputs' keys, skipped when done, resumed when interrupted, redone
with what depends on it when changed):

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

The steps are declared with the generic kinds of `moe_jax.pipeline.steps`. `run_distillation(cfg,
DIR)` then measures the teacher, the student's base and the student on the R1 pipeline's held-out
set into `DIR/results.md|csv|png`. `moe_jax.distill.table6` reuses these
steps for R1's Table 6.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging

from moe_jax.distill.config import STUDENT_RUNS, DistillConfig, KDRunConfig
from moe_jax.distill.run import train_kd
from moe_jax.distill.teacher import CACHE_FILE, CACHE_INFO_FILE, Teacher, load_teacher, write_topk_cache
from moe_jax.errors import InputError
from moe_jax.parallel import make_mesh
from moe_jax.parallel.distributed import is_lead
from moe_jax.pipeline import datasets, report
from moe_jax.pipeline.executor import Step, run_steps, step_key
from moe_jax.pipeline.prompts import TRACES_OFFSET, heldout_problems, seen_problems
from moe_jax.pipeline.r1 import run_pipeline
from moe_jax.pipeline.rejection import write_rejection_dataset
from moe_jax.pipeline.steps import (
    dataset_step,
    finished_run,
    measure_step,
    record_step,
    run_model_loader,
    train_step,
)
from moe_jax.rl.config import GRPOConfig
from moe_jax.train import workdir as workdir_format
from moe_jax.train.experiment_config import RunConfig, run_task

TEACHER_STAGE = "final_rl"  # the pipeline stage that teaches when the distillation runs its own pipeline


@dataclasses.dataclass
class Distillation:
    """The steps of one distillation folder (module docstring)."""

    cfg: DistillConfig
    workdir: str
    mesh_spec: str | None = None
    student_init_from: str | None = None  # hf:<folder> (or a run) as the student's base, instead of pretraining

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

    def _teacher(self) -> Teacher:
        return load_teacher(self.teacher_source, self._mesh())

    # The steps every distillation shares.
    def teacher_stage(self) -> Step:
        teacher = self.cfg.teacher
        if not teacher.source:
            def run_teacher(stage_dir: str, inputs: Mapping[str, str]) -> None:
                run_pipeline(self.cfg.pipeline, stage_dir, mesh_spec=self.mesh_spec, only=(TEACHER_STAGE,))
                if is_lead():
                    workdir_format.mark_done(stage_dir, 0, {"source": self.teacher_source})

            return Step("teacher", run_teacher, {"pipeline": self.cfg.pipeline})
        finished = finished_run(teacher.source, "DistillConfig.teacher.source", allow_unfinished=teacher.allow_unfinished,
                                allow_flag="--config.teacher.allow_unfinished")  # a retrained teacher changes the key
        local = teacher.source.removeprefix("hf:")
        return record_step("teacher", {"source": os.path.abspath(local), "hf": teacher.source.startswith("hf:"),
                                       "finished": finished}, teacher.source)

    def traces_stage(self) -> Step:
        given = self.cfg.teacher.traces
        if given:
            if not os.path.exists(given):
                raise InputError(f"DistillConfig.teacher.traces: {given} does not exist. Fix: give a dataset file "
                                 "or folder (e.g. an R1 pipeline's DIR/rejection_sampling), or leave it empty")
            data = self.traces_data
            return record_step("traces", {"traces": os.path.abspath(data), "bytes": os.path.getsize(data),
                                          "modified": os.path.getmtime(data)}, data, inputs=("teacher",))
        cfg = self.cfg
        settings = {"rejection": cfg.teacher.rejection, "seed": cfg.pipeline.seed,
                    "tasks": [cfg.pipeline.task, cfg.pipeline.task_options, cfg.pipeline.non_reasoning,
                              cfg.pipeline.non_reasoning_options, cfg.pipeline.non_reasoning_share],
                    "template": cfg.pipeline.template, "excluded": step_key({"seen": sorted(self.excluded())}, [])}
        return dataset_step("traces", self._write_traces, settings, ("teacher",))

    def excluded(self) -> set[str]:
        """Problems the traces must not pose: the pipeline's eval sets and RL prompts, and the
        held-out sets the student's runs evaluate on, for every seed the study uses."""
        cfg = self.cfg
        seen = seen_problems(cfg.pipeline)
        for offset in range(cfg.study.seeds):
            for run in map(cfg.stage_run, STUDENT_RUNS):
                seen |= {datasets.problem_identity(p) for p in
                         heldout_problems(run_task(run), run.seed + offset, run.loop.eval_problems)}
        return seen

    def _write_traces(self, stage_dir: str, inputs: Mapping[str, str]) -> None:
        cfg, mesh = self.cfg, self._mesh()
        teacher = load_teacher(self.teacher_source, mesh)
        write_rejection_dataset(stage_dir, teacher.model, teacher.tokenizer, cfg.pipeline, cfg.teacher.rejection,
                                seed=cfg.pipeline.seed + TRACES_OFFSET, excluded=self.excluded(), mesh=mesh)

    def topk_stage(self) -> Step:
        kd, seq_len = self.cfg.kd, self.cfg.stage_run("student").seq_len

        def write(stage_dir: str, inputs: Mapping[str, str]) -> None:
            mesh = self._mesh()
            info = write_topk_cache(load_teacher(self.teacher_source, mesh), self.traces_data, stage_dir, k=kd.top_k,
                                    seq_len=seq_len, mesh=mesh)
            if is_lead():
                workdir_format.mark_done(stage_dir, 0, info)

        return Step("topk", write, {"k": kd.top_k, "seq_len": seq_len}, ("teacher", "traces"),
                    outputs=(CACHE_FILE, CACHE_INFO_FILE))

    # The student's steps.
    def base_stage(self, name: str, run: RunConfig) -> Step:
        if self.student_init_from:
            return record_step(name, {"init_from": self.student_init_from}, self.student_init_from)
        return train_step(name, run, mesh_spec=self.mesh_spec)

    def base_source(self, base_stage: str) -> str:
        """What starts from the student's base: `student_init_from`, or the base step's model."""
        return self.student_init_from or base_stage

    def model_path(self, stage: str, *, base: bool = False) -> str:
        """Where the model of `stage` is read from (a base step's may be outside the graph)."""
        return self.student_init_from if base and self.student_init_from else self.path(stage)

    def kd_stage(self, name: str, base: str, run: KDRunConfig) -> Step:
        """The student's KD run from the base step `base` on the traces."""
        uses_logits = run.kd.uses_teacher_logits
        inputs = ("teacher", "traces", base, *(("topk",) if uses_logits else ()))
        source = self.base_source(base)

        def distill(stage_dir: str, input_dirs: Mapping[str, str]) -> None:
            train_kd(dataclasses.replace(run, data=self.traces_data), stage_dir,
                     teacher=self._teacher() if uses_logits else None, cache=input_dirs.get("topk"),
                     mesh_spec=self.mesh_spec, init_from=input_dirs.get(source, source))

        return Step(name, distill, {"run": run}, inputs, outputs=(workdir_format.CHECKPOINT_DIR,))

    def rl_stage(self, name: str, start: str, run: GRPOConfig, init_from: str | None = None) -> Step:
        """GRPO (R1-Zero's rewards) from the model of step `start` (or `init_from`, what that step stands for)."""
        return train_step(name, run, inputs=(start,), init_from=init_from or start, mesh_spec=self.mesh_spec)

    def stages(self) -> list[Step]:
        cfg = self.cfg
        logits = [self.topk_stage()] if cfg.kd.uses_teacher_logits else []
        return [self.teacher_stage(), self.traces_stage(), *logits,
                self.base_stage("student_base", cfg.stage_run("student_base")),
                self.kd_stage("student", "student_base", cfg.stage_run("student"))]

    # Measuring.
    def measure(self, stage: str, model_source: str, run: RunConfig | None = None) -> dict[str, Any]:
        """The results-table columns of the model `model_source` (the teacher when `run` is None),
        measured once per step key on the pipeline's held-out problems."""
        cfg, stage_dir = self.cfg, self.path(stage)
        if run is None:
            def load(mesh: jax.sharding.Mesh) -> tuple:
                teacher = load_teacher(model_source, mesh)
                return teacher.model, teacher.tokenizer
        else:
            load = run_model_loader(run, model_source, stage_dir)
        return measure_step(stage_dir, load, cfg.pipeline.stage_run("final_rl"), cfg.report, seed=cfg.pipeline.seed,
                            template=cfg.pipeline.template, mesh=self._mesh())

    def columns(self) -> list[str]:
        p, k = self.cfg.pipeline, self.cfg.report.pass_k
        return ["stage", f"accuracy/{p.task}", f"pass@{k}", "format", "language", "language_mixed", "length_correct",
                "length_incorrect", f"accuracy/{p.non_reasoning}", "params", "wall_s"]


def run_distillation(cfg: DistillConfig, workdir: str, *, mesh_spec: str | None = None,
                     student_init_from: str | None = None, only: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run, resume or skip every stage into `workdir/<stage>/`, then write the results table of the
    teacher, the student's base and the student (when every stage ran)."""
    distillation = Distillation(cfg, workdir, mesh_spec, student_init_from)
    run_steps(workdir, distillation.stages(), only=only)
    if only:
        return {}
    d = distillation
    rows = {"teacher": d.measure("teacher", d.teacher_source),
            "student_base": d.measure("student_base", d.model_path("student_base", base=True),
                                      cfg.stage_run("student_base")),
            f"student ({cfg.kd.mode} KD)": d.measure("student", d.path("student"), cfg.stage_run("student"))}
    rows["teacher"]["wall_s"] = None  # trained elsewhere (or by the pipeline, whose table has its times)
    if is_lead():
        report.write_results(workdir, rows, distillation.columns(),
                             f"Distillation of {distillation.teacher_source} into {cfg.model.name} (seed {cfg.seed})")
    logging.info("results: %s", os.path.join(workdir, report.RESULTS_MD))
    return rows

