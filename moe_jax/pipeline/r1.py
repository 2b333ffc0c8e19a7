"""DeepSeek-R1's multi-stage pipeline (§2.3) as one resumable graph of ordinary runs:

    base ─► cold_start ─► reasoning_rl ─► rejection_sampling ─┐
      │                                                         ▼
      ├──────────────────────────────────────────────────────► sft ─► final_rl
      └─► r1_zero   (the baseline: GRPO from the base for as many RL steps)

With `cold_start_data.source=r1_zero` (R1's own recipe) the cold start is written from R1-Zero's
samples, so `r1_zero` runs first and `cold_start` reads it too, and `r1_zero_long` (GRPO from the
base for every RL step of the pipeline, R1-Zero's included) joins the baselines.

`run_pipeline(cfg, DIR)` runs (or resumes, or skips) each stage in `DIR/<stage>/` (a step of
`moe_jax.pipeline.executor`, declared with the generic kinds of `moe_jax.pipeline.steps`), then
measures every stage's model on one held-out set and writes `DIR/results.md`, `results.csv` and
`results.png` (`moe_jax.pipeline.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from moe_jax import runs
from moe_jax.data.tokenizer import load_tokenizer
from moe_jax.parallel import make_mesh, parse_rules
from moe_jax.parallel.distributed import is_lead, sync
from moe_jax.pipeline import cold_start, datasets, report
from moe_jax.pipeline.config import RUN_STAGES, STAGES, PipelineConfig
from moe_jax.pipeline.executor import Step, run_steps, step_seconds
from moe_jax.pipeline.prompts import COLD_START_OFFSET, REJECTION_OFFSET, seen_problems, seen_problems_key
from moe_jax.pipeline.rejection import write_rejection_dataset
from moe_jax.pipeline.steps import dataset_step, measure_step, record_step, run_model_loader, train_step
from moe_jax.train import workdir as workdir_format
from moe_jax.train.context import load_model
from moe_jax.train.experiment_config import RunConfig, run_task
from moe_jax.train.workdir import write_text_atomically

PIPELINE_CONFIG_FILE = "pipeline.json"


@dataclasses.dataclass
class R1Pipeline:
    """The steps of one pipeline folder (see the module docstring)."""

    cfg: PipelineConfig
    workdir: str
    mesh_spec: str | None = None
    init_from: str | None = None  # an `hf:<folder>` (or another run) as the base, instead of pretraining

    @property
    def base_source(self) -> str:
        """What the stages that start from the base load: `init_from`, or the base stage's model."""
        return self.init_from or "base"

    def stages(self) -> list[Step]:
        cfg, mesh, run_of = self.cfg, self.mesh_spec, self.stage_runs()
        base = (record_step("base", {"init_from": self.init_from}, self.init_from) if self.init_from
                else train_step("base", run_of["base"], mesh_spec=mesh))
        r1_zero = train_step("r1_zero", run_of["r1_zero"], inputs=("base",), init_from=self.base_source,
                             mesh_spec=mesh)
        from_r1_zero = cfg.cold_start_data.source == "r1_zero"  # then R1-Zero runs first: the cold start reads it
        return [
            base,
            *([r1_zero] if from_r1_zero else []),
            Step("cold_start", self._cold_start, {"run": run_of["cold_start"], "data": cfg.cold_start_data},
                 ("base", "r1_zero") if from_r1_zero else ("base",)),
            train_step("reasoning_rl", run_of["reasoning_rl"], inputs=("cold_start",), init_from="cold_start",
                       mesh_spec=mesh),
            dataset_step("rejection_sampling", self._rejection_sampling, self._rejection_settings(), ("reasoning_rl",)),
            train_step("sft", run_of["sft"], inputs=("base", "rejection_sampling"), init_from=self.base_source,
                       data_from="rejection_sampling", mesh_spec=mesh),
            train_step("final_rl", run_of["final_rl"], inputs=("sft",), init_from="sft", mesh_spec=mesh),
            *([train_step("r1_zero_long", run_of["r1_zero_long"], inputs=("base",), init_from=self.base_source,
                          mesh_spec=mesh)] if from_r1_zero else [r1_zero]),
        ]

    def _cold_start(self, stage_dir: str, inputs: Mapping[str, str]) -> None:
        """The cold-start set from its source (`moe_jax.pipeline.cold_start`) into the stage's
        folder (whole when its `stats.json` is there), then SFT of the base on it."""
        cfg, data, run = self.cfg, self.cfg.cold_start_data, self.cfg.stage_run("cold_start")
        if not os.path.exists(os.path.join(stage_dir, datasets.STATS_FILE)):
            task, seed = run_task(run), cfg.seed + COLD_START_OFFSET
            rejected: list = []
            if data.source == "r1_zero":  # every process samples (one program); the lead writes
                policy, tokenizer, mesh, rules = self._load_policy(inputs["r1_zero"], cfg.r1_zero())
                records, rejected, stats = cold_start.r1_zero_records(
                    policy, task, tokenizer, data, cfg.template, seed=seed, excluded=seen_problems(cfg), mesh=mesh,
                    rules=rules)
            else:
                problems = datasets.fresh_problems(task, seed, data.examples, seen_problems(cfg))
                records = cold_start.synthetic_records(task, problems, data, cfg.template, seed=seed)
                stats = {"source": data.source, "kept": len(records)}
            if is_lead():
                datasets.write_dataset(stage_dir, records, stats, cfg.rejection_sampling.array_record_above, rejected)
        sync("cold start data")
        runs.run(dataclasses.replace(run, data=datasets.dataset_path(stage_dir)), stage_dir, mesh_spec=self.mesh_spec,
                 init_from=inputs.get(self.base_source, self.base_source))

    def _load_policy(self, run_dir: str, run: RunConfig) -> tuple[Any, Any, Any, Any]:
        """(model, tokenizer, mesh, rules) of the run in `run_dir`, for sampling."""
        mesh, rules = make_mesh(self.mesh_spec or "auto"), parse_rules(run.sharding_rules)
        tokenizer = load_tokenizer(workdir_format.tokenizer_path(run_dir, run))
        return load_model(run.model, run_dir, mesh, rules, run.compute_dtype), tokenizer, mesh, rules

    def _rejection_settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"rejection": cfg.rejection_sampling, "seed": cfg.seed,
                "task": [cfg.task, cfg.task_options], "template": cfg.template,
                "non_reasoning": [cfg.non_reasoning, cfg.non_reasoning_options, cfg.non_reasoning_share],
                "model": cfg.model, "seen": seen_problems_key(cfg)}

    def _rejection_sampling(self, stage_dir: str, inputs: Mapping[str, str]) -> None:
        cfg = self.cfg
        policy, tokenizer, mesh, rules = self._load_policy(inputs["reasoning_rl"], cfg.stage_run("reasoning_rl"))
        write_rejection_dataset(stage_dir, policy, tokenizer, cfg, cfg.rejection_sampling,
                                seed=cfg.seed + REJECTION_OFFSET, excluded=seen_problems(cfg), mesh=mesh, rules=rules)

    def stage_runs(self) -> dict[str, RunConfig]:
        """The run config of every stage that trains, by name."""
        baselines = {"r1_zero": self.cfg.r1_zero()}
        if self.cfg.cold_start_data.source == "r1_zero":
            baselines["r1_zero_long"] = self.cfg.r1_zero_long()
        return {**{stage: self.cfg.stage_run(stage) for stage in RUN_STAGES}, **baselines}

    def results(self, keys: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Every stage's row (its model measured once per stage key, cached in `report.json`),
        written to `results.md` / `.csv` / `.png`."""
        cfg, runs = self.cfg, self.stage_runs()
        mesh = make_mesh(self.mesh_spec or "auto")
        rows: dict[str, dict[str, Any]] = {}
        for stage in STAGES:
            if stage not in keys:
                continue
            stage_dir = os.path.join(self.workdir, stage)
            if stage == "rejection_sampling":
                done = workdir_format.read_done(stage_dir)["metrics"]
                rows[stage] = {"tokens": done.get("tokens_sampled"), "wall_s": step_seconds(stage_dir),
                               "kept": done.get("kept"), "sampled": done.get("sampled")}
                continue
            outside = stage == "base" and self.init_from
            load = run_model_loader(runs[stage], self.init_from if outside else stage_dir, stage_dir)
            measures = measure_step(stage_dir, load, runs["final_rl"], cfg.report, seed=cfg.seed, template=cfg.template,
                                    mesh=mesh)
            tokens = 0 if outside else report.run_tokens(stage_dir, runs[stage])
            rows[stage] = {**measures, "tokens": tokens}
        if is_lead():
            k, reasoning = cfg.report.pass_k, cfg.task
            columns = [c.format(task=reasoning, k=k, non_reasoning=cfg.non_reasoning) for c in report.COLUMNS]
            report.write_results(self.workdir, rows, columns, f"R1 pipeline ({cfg.task}, seed {cfg.seed})")
        return rows


def run_pipeline(cfg: PipelineConfig, workdir: str, *, mesh_spec: str | None = None, init_from: str | None = None,
                 only: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run, resume or skip every stage into `workdir/<stage>/`, then write the results table
    (when every stage ran: `only` stops after the named stages and what they read)."""
    pipeline = R1Pipeline(cfg, workdir, mesh_spec, init_from)
    steps = pipeline.stages()  # a bad input fails here, before anything is written
    if is_lead():
        workdir_format.require_directory(workdir)
        os.makedirs(workdir, exist_ok=True)
        write_text_atomically(os.path.join(workdir, PIPELINE_CONFIG_FILE),
                              json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    keys = run_steps(workdir, steps, only=only)
    return pipeline.results(keys) if not only else {}
