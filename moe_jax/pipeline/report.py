"""The pipeline's results table: every stage's model measured on one held-out set.

Per stage: greedy accuracy per task, pass@k of the reasoning task (k samples at the report's
temperature: a problem passes when any sample is right), the greedy format rate, R1's language
consistency (the mean share of chain-of-thought words in the prompt's language) and the share of
completions that mix languages — both over the k sampled completions, the policy's habit — the
mean greedy completion length (tokens) of correct and of incorrect answers, the non-reasoning
task's accuracy, and the tokens and wall time the stage spent.
Written as `results.md`, `results.csv` and `results.png`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from moe_jax.data.tasks import Problem, Task
from moe_jax.data.tokenizer import Tokenizer
from moe_jax.models import Transformer
from moe_jax.models.sampler import SamplingConfig
from moe_jax.parallel.distributed import is_lead
from moe_jax.parallel.rules import Rules
from moe_jax.pipeline.config import ReportConfig
from moe_jax.pipeline.executor import step_key
from moe_jax.rl.sampling import sample_problems
from moe_jax.train.experiment_config import RunConfig
from moe_jax.train.metrics import METRICS_FILE, read_metrics
from moe_jax.train.workdir import read_json, write_text_atomically

RESULTS_MD, RESULTS_CSV, RESULTS_PNG = "results.md", "results.csv", "results.png"
REPORT_FILE = "report.json"  # a stage's measures, cached under its key


def measure(policy: Transformer, task: Task, problems: Sequence[Problem], cfg: ReportConfig, *,
            tokenizer: Tokenizer, template: str, key: jax.Array, mesh: jax.sharding.Mesh,
            rules: Rules | None = None) -> dict[str, float]:
    """The table's model columns for one model (see the module docstring)."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    sampled = sample_problems(policy, task, problems, tokenizer=tokenizer, template=template, sampling=greedy,
                              key=None, mesh=mesh, rules=rules)
    texts, lengths = sampled.texts(tokenizer), sampled.lengths
    correct = np.asarray([task.verify(p, t) for p, t in zip(problems, texts)])
    reasoning = np.asarray([task.is_reasoning(p) for p in problems])
    names = np.asarray([p.task for p in problems])
    row: dict[str, float] = {f"accuracy/{name}": float(correct[names == name].mean()) for name in sorted(set(names))}
    thought = [p for p, r in zip(problems, reasoning) if r]
    row["format"] = float(np.mean([task.parse(p, t).format_ok for p, t, r in zip(problems, texts, reasoning) if r]))
    for label, selected in (("length_correct", correct & reasoning), ("length_incorrect", ~correct & reasoning)):
        row[label] = float(lengths[selected].mean()) if selected.any() else math.nan
    k = cfg.pass_k
    at_temperature = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                    samples_per_prompt=k)
    texts_k = sample_problems(policy, task, thought, tokenizer=tokenizer, template=template, sampling=at_temperature,
                              key=key, mesh=mesh, rules=rules).texts(tokenizer)
    problems_k = [p for p in thought for _ in range(k)]
    passed = np.asarray([task.verify(p, t) for p, t in zip(problems_k, texts_k)])
    row[f"pass@{k}"] = float(passed.reshape(len(thought), k).any(axis=1).mean())
    # Language is the policy's habit, so it is read off the sampled chains (greedy decoding
    # hides a mixing the model does at temperature: R1-Zero's traces mixed when sampled).
    row["language"] = float(np.mean([task.language_consistency(p, t) for p, t in zip(problems_k, texts_k)]))
    row["language_mixed"] = float(np.mean([task.mixes_languages(p, t) for p, t in zip(problems_k, texts_k)]))
    return row


def cached_measures(step_dir: str, step_keys: Sequence[str], settings: Any,
                    measure_fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`measure_fn()` of the model in `step_dir`, computed once per step key (any of `step_keys`,
    the keys its folder answers to) and report `settings`, kept in its `report.json` (written by
    the lead process)."""
    settings_key = step_key(settings, [])
    cached = read_json(os.path.join(step_dir, REPORT_FILE))
    if cached is None or cached["key"][0] not in step_keys or cached["key"][1] != settings_key:
        cached = {"key": [step_keys[0], settings_key], "measures": measure_fn()}
        if is_lead():
            write_text_atomically(os.path.join(step_dir, REPORT_FILE), json.dumps(cached, indent=2))
    return cached["measures"]


def run_tokens(step_dir: str, cfg: RunConfig) -> int:
    """Tokens the run in `step_dir` processed (`RunConfig.tokens_processed` of its metrics)."""
    path = os.path.join(step_dir, METRICS_FILE)
    return cfg.tokens_processed(read_metrics(path) if os.path.exists(path) else [])


COLUMNS = ("stage", "accuracy/{task}", "pass@{k}", "format", "language", "language_mixed", "length_correct",
           "length_incorrect", "accuracy/{non_reasoning}", "tokens", "wall_s")


def write_results(workdir: str, rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str],
                  title: str) -> None:
    """`results.md` (a table, then the notes), `results.csv` and `results.png` in `workdir`. A
    cell may hold a (mean, std) pair over seeds, written `mean ± std` (and drawn at its mean)."""
    def cell(value: Any) -> str:
        if isinstance(value, tuple):
            return "" if math.isnan(value[0]) else f"{cell(value[0])} ± {cell(value[1])}"
        if isinstance(value, float):  # rates to 3 places, lengths and seconds to 1
            return "" if math.isnan(value) else f"{value:.3f}" if abs(value) <= 1 else f"{value:.1f}"
        return "" if value is None else str(value)

    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for stage, row in rows.items():
        lines.append("| " + " | ".join(cell({**row, "stage": stage}.get(c)) for c in columns) + " |")
    write_text_atomically(os.path.join(workdir, RESULTS_MD), "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for stage, row in rows.items():
        writer.writerow([cell({**row, "stage": stage}.get(c)) for c in columns])
    write_text_atomically(os.path.join(workdir, RESULTS_CSV), buffer.getvalue())
    plot_results(os.path.join(workdir, RESULTS_PNG), rows, [c for c in columns if c != "stage"])


def plot_results(path: str, rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> None:
    """One bar chart per column, a bar per stage (Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = 3
    nrows = math.ceil(len(columns) / ncols)
    fig = Figure(figsize=(5 * ncols, 3 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    stages = list(rows)
    for i, column in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = [value[0] if isinstance(value := rows[s].get(column), tuple) else value for s in stages]
        ax.bar(range(len(stages)), [v if isinstance(v, (int, float)) and not math.isnan(v) else 0 for v in values])
        ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right", fontsize=8)
        ax.set_title(column)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path + ".tmp", format="png", dpi=90)
    os.replace(path + ".tmp", path)
