"""DeepSeek-R1's multi-stage pipeline (§2.3) as one resumable graph of ordinary runs:

    base ─► cold_start ─► reasoning_rl ─► rejection_sampling ─┐
      │                                                         ▼
      ├──────────────────────────────────────────────────────► sft ─► final_rl
      └─► r1_zero   (the baseline: GRPO from the base for as many RL steps)

`run_pipeline(cfg, DIR)` runs (or resumes, or skips) each stage in `DIR/<stage>/`
(`moe_jax.pipeline.stages`), then measures every stage's model on one held-out set and writes
`DIR/results.md`, `results.csv` and `results.png` (`moe_jax.pipeline.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging
from flax import nnx

from moe_jax.data.pipelines import problem_at, rl_prompt_order
from moe_jax.data.records import write_jsonl
from moe_jax.data.tasks import Problem, Task, make_task
from moe_jax.data.tokenizer import Tokenizer, load_tokenizer
from moe_jax.parallel import make_mesh, parse_rules
from moe_jax.parallel.rules import Rules
from moe_jax.pipeline import datasets, report
from moe_jax.pipeline.config import STAGES, PipelineConfig, RejectionConfig
from moe_jax.pipeline.rejection import rejection_sample, removal_summary
from moe_jax.pipeline.stages import Stage, is_lead, run_stages, stage_key, stage_seconds, sync
from moe_jax.rl.config import GRPOConfig
from moe_jax.rl.trainer import train_grpo
from moe_jax.train import workdir as workdir_format
from moe_jax.train.context import load_model
from moe_jax.train.evaluation import heldout_seed
from moe_jax.train.experiment_config import RunConfig, parse_options
from moe_jax.train.trainer import train
from moe_jax.train.workdir import write_json_atomically

# Each dataset stage draws its problems from a stream of its own (seed + offset), so that no two
# stages, and no eval set, share a stream.
COLD_START_OFFSET, REJECTION_OFFSET, NON_REASONING_OFFSET = 2_000_003, 3_000_017, 4_000_037
PIPELINE_CONFIG_FILE = "pipeline.json"
MODEL_STAGES = ("base", "cold_start", "reasoning_rl", "sft", "final_rl", "r1_zero")


def _task(run: RunConfig) -> Task:
    return make_task(run.task, **parse_options(run.task_options))


def _identities(problems: Sequence[Problem]) -> set[str]:
    return {datasets.problem_identity(p) for p in problems}


def seen_problems(cfg: PipelineConfig) -> set[str]:
    """The identities of every problem an eval set or the reasoning-RL stage poses: what the
    cold-start and rejection-sampling prompts must avoid."""
    seen: set[str] = set()
    for run in (cfg.base, cfg.cold_start, cfg.reasoning_rl, cfg.sft, cfg.final_rl):
        seen |= _identities(report.heldout_problems(_task(run), cfg.seed, run.loop.eval_problems))
    seen |= _identities(report.heldout_problems(_task(cfg.final_rl), cfg.seed, cfg.report.problems))
    rl = cfg.reasoning_rl
    served = rl.steps * rl.prompts_per_step * (1 + rl.max_resamples * rl.dynamic_sampling)
    order = rl_prompt_order(rl.seed)
    seen |= _identities([problem_at(_task(rl), rl.seed, int(order[j])) for j in range(served)])
    return seen


def _load_model(run: RunConfig, source: str, mesh: jax.sharding.Mesh) -> nnx.Module:
    return load_model(run.model, source, mesh, parse_rules(run.sharding_rules), run.compute_dtype)


@dataclasses.dataclass
class R1Pipeline:
    """The stages of one pipeline folder (see the module docstring)."""

    cfg: PipelineConfig
    workdir: str
    mesh_spec: str | None = None
    init_from: str | None = None  # an `hf:<folder>` (or another run) as the base, instead of pretraining
    allow_config_change: Sequence[str] = ()

    def path(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)

    @property
    def base_source(self) -> str:
        return self.init_from or self.path("base")

    def _train(self, run: RunConfig, stage: str, init_from: str | None) -> None:
        train_fn = train_grpo if isinstance(run, GRPOConfig) else train
        train_fn(run, self.path(stage), mesh_spec=self.mesh_spec, init_from=init_from,
                 allow_config_change=self.allow_config_change)

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        base_settings = {"init_from": self.init_from} if self.init_from else {"run": cfg.base.to_dict()}
        return [
            Stage("base", (), base_settings, self._base),
            Stage("cold_start", ("base",), {"run": cfg.cold_start.to_dict(),
                                            "data": dataclasses.asdict(cfg.cold_start_data)}, self._cold_start),
            Stage("reasoning_rl", ("cold_start",), {"run": cfg.reasoning_rl.to_dict()},
                  lambda d, inputs: self._train(cfg.reasoning_rl, "reasoning_rl", inputs["cold_start"])),
            Stage("rejection_sampling", ("reasoning_rl",), self._rejection_settings(), self._rejection_sampling),
            Stage("sft", ("base", "rejection_sampling"), {"run": cfg.sft.to_dict()}, self._sft),
            Stage("final_rl", ("sft",), {"run": cfg.final_rl.to_dict()},
                  lambda d, inputs: self._train(cfg.final_rl, "final_rl", inputs["sft"])),
            Stage("r1_zero", ("base",), {"run": cfg.r1_zero().to_dict()},
                  lambda d, inputs: self._train(cfg.r1_zero(), "r1_zero", self.base_source)),
        ]

    def _base(self, stage_dir: str, inputs: dict[str, str]) -> None:
        if self.init_from:  # nothing to train: the stage records where the base comes from
            if is_lead():
                workdir_format.mark_done(stage_dir, 0, {"init_from": self.init_from})
            return
        self._train(self.cfg.base, "base", None)

    def _cold_start(self, stage_dir: str, inputs: dict[str, str]) -> None:
        cfg, data = self.cfg, self.cfg.cold_start_data
        path = os.path.join(stage_dir, datasets.DATA_FILE)
        if is_lead() and not os.path.exists(path):  # written atomically: present means whole
            task = _task(cfg.cold_start)
            problems = datasets.fresh_problems(task, cfg.seed + COLD_START_OFFSET, data.examples, seen_problems(cfg))
            write_jsonl(path, datasets.cold_start_records(task, problems, data.retry_rate, cfg.template,
                                                          seed=cfg.seed + COLD_START_OFFSET))
        sync("cold start data")
        self._train(dataclasses.replace(cfg.cold_start, data=path), "cold_start", self.base_source)

    def _rejection_settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"rejection": dataclasses.asdict(cfg.rejection_sampling), "seed": cfg.seed,
                "task": [cfg.task, cfg.task_options], "template": cfg.template,
                "non_reasoning": [cfg.non_reasoning, cfg.non_reasoning_options, cfg.non_reasoning_share],
                "model": dataclasses.asdict(cfg.model), "seen": seen_problems_key(cfg)}

    def _rejection_sampling(self, stage_dir: str, inputs: dict[str, str]) -> None:
        cfg = self.cfg
        mesh = make_mesh(self.mesh_spec or "auto")
        tokenizer = load_tokenizer(workdir_format.tokenizer_path(inputs["reasoning_rl"], cfg.reasoning_rl))
        policy = _load_model(cfg.reasoning_rl, inputs["reasoning_rl"], mesh)
        write_rejection_dataset(stage_dir, policy, tokenizer, cfg, cfg.rejection_sampling,
                                seed=cfg.seed + REJECTION_OFFSET, excluded=seen_problems(cfg), mesh=mesh,
                                rules=parse_rules(cfg.reasoning_rl.sharding_rules))

    def _sft(self, stage_dir: str, inputs: dict[str, str]) -> None:
        data = datasets.dataset_path(inputs["rejection_sampling"])
        self._train(dataclasses.replace(self.cfg.sft, data=data), "sft", self.base_source)

    def stage_runs(self) -> dict[str, RunConfig]:
        cfg = self.cfg
        return {"base": cfg.base, "cold_start": cfg.cold_start, "reasoning_rl": cfg.reasoning_rl, "sft": cfg.sft,
                "final_rl": cfg.final_rl, "r1_zero": cfg.r1_zero()}

    def results(self, keys: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Every stage's row (its model measured once per stage key, cached in `report.json`),
        written to `results.md` / `.csv` / `.png`."""
        cfg, runs = self.cfg, self.stage_runs()
        mesh = make_mesh(self.mesh_spec or "auto")
        task = _task(cfg.final_rl)
        problems = report.heldout_problems(task, cfg.seed, cfg.report.problems)
        settings_key = stage_key(dataclasses.asdict(cfg.report), [])
        rows: dict[str, dict[str, Any]] = {}
        for stage in STAGES:
            if stage not in keys:
                continue
            stage_dir = self.path(stage)
            if stage == "rejection_sampling":
                done = workdir_format.read_done(stage_dir)["metrics"]
                rows[stage] = {"tokens": done.get("tokens_sampled"), "wall_s": stage_seconds(stage_dir),
                               "kept": done.get("kept"), "sampled": done.get("sampled")}
                continue

            def measure_stage(stage: str = stage, stage_dir: str = stage_dir) -> dict[str, float]:
                source = self.base_source if stage == "base" else stage_dir
                tokenizer = load_tokenizer(workdir_format.tokenizer_path(stage_dir, runs[stage]))
                return report.measure(_load_model(runs[stage], source, mesh), task, problems, cfg.report,
                                      tokenizer=tokenizer, template=cfg.template,
                                      key=jax.random.key(heldout_seed(cfg.seed)), mesh=mesh,
                                      rules=parse_rules(runs[stage].sharding_rules))

            measures = report.cached_measures(stage_dir, [keys[stage], settings_key], measure_stage)
            tokens = 0 if stage == "base" and self.init_from else report.stage_tokens(stage_dir, runs[stage])
            rows[stage] = {**measures, "tokens": tokens, "wall_s": stage_seconds(stage_dir)}
        if is_lead():
            k, reasoning = cfg.report.pass_k, cfg.task
            columns = [c.format(task=reasoning, k=k, non_reasoning=cfg.non_reasoning) for c in report.COLUMNS]
            report.write_results(self.workdir, rows, columns, f"R1 pipeline ({cfg.task}, seed {cfg.seed})")
        return rows


def write_rejection_dataset(stage_dir: str, policy: nnx.Module, tokenizer: Tokenizer, cfg: PipelineConfig,
                            rs: RejectionConfig, *, seed: int, excluded: set[str], mesh: jax.sharding.Mesh,
                            rules: Rules | None = None) -> None:
    """R1 §2.3.3 into `stage_dir`: `rs.prompts` fresh reasoning problems (stream `seed`, none of
    `excluded`), `policy`'s samples kept by the filters, the non-reasoning share mixed in; the
    dataset, `rejected.jsonl`, `stats.json` and `DONE` (written by the lead process)."""
    task = _task(cfg.reasoning_rl)
    problems = datasets.fresh_problems(task, seed, rs.prompts, excluded)
    result = rejection_sample(policy, task, problems, tokenizer=tokenizer, template=cfg.template, cfg=rs,
                              key=jax.random.key(seed), mesh=mesh, rules=rules)
    non_reasoning = make_task(cfg.non_reasoning, **parse_options(cfg.non_reasoning_options))
    if not result.records:
        logging.warning("rejection sampling kept no sample (%s): the SFT data is the non-reasoning examples "
                        "alone. Train the policy longer, or sample more", removal_summary(result.stats))
    extra = datasets.mixed_count(rs.prompts, cfg.non_reasoning_share)
    mixed = datasets.non_reasoning_records(non_reasoning, cfg.seed + NON_REASONING_OFFSET, extra, cfg.template,
                                           excluded | _identities(problems))
    stats = {**result.stats, non_reasoning.name: {"generated": len(mixed)},
             "total": {**removal_summary(result.stats), "records": len(result.records) + len(mixed),
                       "tokens_sampled": result.tokens, "seconds": result.seconds}}
    if is_lead():
        datasets.write_dataset(stage_dir, result.records + mixed, stats, rs.array_record_above, result.rejected)
        workdir_format.mark_done(stage_dir, 0, stats["total"])
    sync("rejection sampling written")


def seen_problems_key(cfg: PipelineConfig) -> str:
    """A short hash of the problems rejection sampling must avoid (they follow from the config)."""
    return stage_key({"seen": sorted(seen_problems(cfg))}, [])


def run_pipeline(cfg: PipelineConfig, workdir: str, *, mesh_spec: str | None = None, init_from: str | None = None,
                 only: Sequence[str] = (), allow_config_change: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run, resume or skip every stage into `workdir/<stage>/`, then write the results table
    (when every stage ran: `only` stops after the named stages and what they read)."""
    pipeline = R1Pipeline(cfg, workdir, mesh_spec, init_from, allow_config_change)
    if is_lead():
        os.makedirs(workdir, exist_ok=True)
        write_json_atomically(os.path.join(workdir, PIPELINE_CONFIG_FILE),
                              json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    keys = run_stages(workdir, pipeline.stages(), only=only)
    return pipeline.results(keys) if not only else {}
