"""DeepSeek-R1's Table 6 in miniature: does distilling a strong teacher beat RL on the student?

For each student size (`study.sizes`, dense presets), in `DIR/<size>/`:

    (a) base          the student pretrained on the teacher's base corpus
    (b) rl_only       R1-Zero GRPO from (a), given the wall-clock budget (c) took (same seed)
    (c) seq_kd        sequence-level KD: SFT of (a) on the teacher's verified traces (what R1 did)
    (d) seq_kd_rl     (c) then `study.rl_after_kd_steps` GRPO steps
    (e) logit_kd      generalized-JSD KD on the traces, the teacher's cached top-k (same steps as (c))
    (f) on_policy_kd  GKD: a share λ of the steps on the student's own samples (same steps as (c))

and the teacher. (b) and (c) run `study.seeds` times (the student's seed: data order, sampling);
their rows are each seed's and the mean ± std. Every run is a stage of the distillation graph
(`moe_jax.distill.distillation`): finished ones are skipped, interrupted ones resume. (b) needs
(c)'s wall time, so the graph runs twice: everything but (b), then (b) with its budgets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from absl import logging

from moe_jax.configs import get_preset
from moe_jax.distill.config import DistillConfig, KDRunConfig
from moe_jax.distill.distillation import Distillation
from moe_jax.parallel.distributed import is_lead
from moe_jax.pipeline import report
from moe_jax.pipeline.executor import Step, run_steps, step_seconds
from moe_jax.stats import mean_std_rows
from moe_jax.train import config_tree

SEEDED = ("rl_only", "seq_kd")  # the variants run over several seeds


def sized(cfg: DistillConfig, size: str) -> DistillConfig:
    """The config with the student preset `size` (keeping the row length the tasks need)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(get_preset(size), max_seq_len=cfg.model.max_seq_len))


def _seeded(cfg: DistillConfig, offset: int) -> DistillConfig:
    return dataclasses.replace(cfg, seed=cfg.seed + offset)


def _kd(run: KDRunConfig, mode: str) -> KDRunConfig:
    return dataclasses.replace(run, kd=dataclasses.replace(run.kd, mode=mode))


def study_stages(d: Distillation, budgets: Mapping[str, float] | None) -> list[Step]:
    """The study's stages; with `budgets` (seconds per seq_kd stage) also the RL-only runs."""
    cfg = d.cfg
    stages = [d.teacher_stage(), d.traces_stage(), d.topk_stage()]
    for size in cfg.study.size_names():
        student = sized(cfg, size)
        base = f"{size}/base"
        stages.append(d.base_stage(base, student.stage_run("student_base")))
        for i in range(cfg.study.seeds):
            stages.append(d.kd_stage(f"{size}/seq_kd-seed{i}", base,
                                     _kd(_seeded(student, i).stage_run("student"), "sequence")))
        rl_after = dataclasses.replace(student.stage_run("rl"), steps=cfg.study.rl_after_kd_steps)
        stages.append(d.rl_stage(f"{size}/seq_kd_rl", f"{size}/seq_kd-seed0", rl_after))
        stages.append(d.kd_stage(f"{size}/logit_kd", base, _kd(student.stage_run("student"), "logit")))
        stages.append(d.kd_stage(f"{size}/on_policy_kd", base, _kd(student.stage_run("student"), "on_policy")))
        if budgets is not None:
            for i in range(cfg.study.seeds):
                run = config_tree.override(_seeded(student, i).stage_run("rl"),
                                           {"loop.max_seconds": budgets[f"{size}/seq_kd-seed{i}"]})
                stages.append(d.rl_stage(f"{size}/rl_only-seed{i}", base, run, init_from=d.base_source(base)))
    return stages


def run_table6(cfg: DistillConfig, workdir: str, *, mesh_spec: str | None = None) -> dict[str, dict[str, Any]]:
    """Run (or resume) the study in `workdir` and write its `results.md|csv|png`; returns the rows."""
    d = Distillation(cfg, workdir, mesh_spec)
    run_steps(workdir, study_stages(d, None))
    sizes, seeds = cfg.study.size_names(), range(cfg.study.seeds)
    budgets = {f"{size}/seq_kd-seed{i}": float(round(step_seconds(d.path(f"{size}/seq_kd-seed{i}"))))
               for size in sizes for i in seeds}
    logging.info("RL-only wall-clock budgets (s): %s", budgets)
    run_steps(workdir, study_stages(d, budgets))

    rows: dict[str, dict[str, Any]] = {"teacher": {**d.measure("teacher", d.teacher_source), "wall_s": None}}
    for size in sizes:
        student = sized(cfg, size)
        base, kd, rl = (student.stage_run(name) for name in ("student_base", "student", "rl"))
        runs = {"base": base, "seq_kd_rl": rl, "logit_kd": kd, "on_policy_kd": kd, "rl_only": rl, "seq_kd": kd}
        for variant in ("base", "rl_only", "seq_kd", "seq_kd_rl", "logit_kd", "on_policy_kd"):
            names = [f"{size}/{variant}-seed{i}" for i in seeds] if variant in SEEDED else [f"{size}/{variant}"]
            measured = [d.measure(name, d.model_path(name, base=variant == "base"), runs[variant]) for name in names]
            if variant in SEEDED:
                rows.update({name: m for name, m in zip(names, measured)})
                rows[f"{size}/{variant} (mean ± std, {len(names)} seeds)"] = mean_std_rows(measured)
            else:
                rows[names[0]] = measured[0]
    if is_lead():
        report.write_results(workdir, rows, d.columns(), f"R1 Table 6 in miniature: {d.teacher_source} into "
                             f"{', '.join(sizes)}")
    return rows
