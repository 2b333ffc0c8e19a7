"""Several pipeline folders (one per `--config.seed`) summed up: each results column as mean ± std,
and the measures behind R1's three questions —

- does R1 beat R1-Zero on accuracy *and* on language consistency (`final_rl` vs `r1_zero`)?
- does the cold start make stage 2 converge faster (reasoning_rl's held-out accuracy curve against
  r1_zero's over the same first steps, and the accuracy reward of their first and last steps)?
- does the completion length grow during stage 2 (its first against its last steps)?
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_jax.pipeline.report import RESULTS_CSV
from moe_jax.rl.config import MEAN_LENGTH
from moe_jax.stats import summarize
from moe_jax.train.metrics import METRICS_FILE, read_metrics

WINDOW = 5  # steps averaged at the start and at the end of a run's curve


def _table(workdir: str) -> dict[str, dict[str, float]]:
    with open(os.path.join(workdir, RESULTS_CSV)) as f:
        return {row.pop("stage"): {k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)}


def _mean_std(values: Sequence[float]) -> str:
    summary = summarize(values)
    if not summary.n:
        return ""
    mean, std = summary.mean, summary.std
    places = 3 if abs(mean) <= 1 else 1 if abs(mean) < 1000 else 0  # rates, lengths and seconds, token counts
    return f"{mean:.{places}f} ± {std:.{places}f}"


def _curve(workdir: str, stage: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(os.path.join(workdir, stage, METRICS_FILE)) if key in r}


def _ends(curve: dict[int, float]) -> tuple[float, float]:
    steps = sorted(s for s in curve if s > 0)
    return (float(np.mean([curve[s] for s in steps[:WINDOW]])), float(np.mean([curve[s] for s in steps[-WINDOW:]])))


def stage2_measures(workdir: str) -> dict[str, Any]:
    """reasoning_rl against r1_zero over reasoning_rl's steps: held-out accuracy at each eval, the
    accuracy reward of the sampled completions (the total is not comparable: the two weigh the
    language reward differently) and their length over the first and last `WINDOW` steps."""
    rl = _curve(workdir, "reasoning_rl", "eval/accuracy")
    zero = _curve(workdir, "r1_zero", "eval/accuracy")
    shared = [s for s in sorted(rl) if s in zero]
    measures: dict[str, Any] = {"eval_steps": shared, "reasoning_rl_accuracy": [rl[s] for s in shared],
                                "r1_zero_accuracy": [zero[s] for s in shared]}
    last = max(_curve(workdir, "reasoning_rl", "reward"))
    for stage in ("reasoning_rl", "r1_zero"):
        for key, name in (("rewards/accuracy/mean", "reward"), (MEAN_LENGTH, "length")):
            curve = {s: v for s, v in _curve(workdir, stage, key).items() if s <= last}
            measures[f"{stage}_{name}_first_last"] = _ends(curve)
    return measures


def summary(workdirs: Sequence[str]) -> str:
    """Markdown: the results columns as mean ± std over the folders, then stage 2's measures."""
    tables = [_table(w) for w in workdirs]
    stages = list(tables[0])
    columns = list(tables[0][stages[0]])
    lines = [f"Over {len(workdirs)} seeds (mean ± std): {', '.join(workdirs)}", "",
             "| stage | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for stage in stages:
        cells = [_mean_std([t[stage][c] for t in tables]) for c in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "Stage 2 (reasoning_rl, from the cold start) against r1_zero (from the base) over the same steps:", ""]
    per_seed = [stage2_measures(w) for w in workdirs]
    steps = per_seed[0]["eval_steps"]
    lines += ["| held-out accuracy at step | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
    for stage in ("reasoning_rl", "r1_zero"):
        cells = [_mean_std([m[f"{stage}_accuracy"][i] for m in per_seed]) for i in range(len(steps))]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", f"| first → last {WINDOW} steps | accuracy reward (sampled) | completion length |", "|---|---|---|"]
    for stage in ("reasoning_rl", "r1_zero"):
        cells = []
        for name in ("reward", "length"):
            first = _mean_std([m[f"{stage}_{name}_first_last"][0] for m in per_seed])
            last = _mean_std([m[f"{stage}_{name}_first_last"][1] for m in per_seed])
            cells.append(f"{first} → {last}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
