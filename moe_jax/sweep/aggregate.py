"""A sweep's results, or any folder of runs': a row per point (`results.csv`), a summary per
configuration over seeds with t-intervals and, against a baseline, paired-by-seed differences
(`results.md`), and plots (`curves.png`, `finals.png`).

    from moe_jax.sweep.aggregate import aggregate
    table = aggregate("/tmp/sweep")                   # what experiments/sweep.py --aggregate does
    table = aggregate("/tmp/r1_seeds", ["/tmp/r1_s0", "/tmp/r1_s1", "/tmp/r1_s2"])  # runs of no sweep

A point's columns: its axis values, `seed`, `status`, for a single run the final and best value of
every eval metric it logged and of the experiment's plotted metrics (`<metric>/final`,
`<metric>/best`), for a graph (R1 pipeline, distillation) its own `results.csv` by stage
(`<stage>/<column>`), then `tokens` and `wall_s`. Runs that were not launched by a sweep are
grouped by the fields their saved configs differ in.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from moe_jax.pipeline.executor import step_seconds
from moe_jax.pipeline.r1 import PIPELINE_CONFIG_FILE
from moe_jax.pipeline.report import RESULTS_CSV, RESULTS_MD, run_tokens
from moe_jax.stats import Summary, paired_difference, summarize
from moe_jax.sweep import claims
from moe_jax.sweep.claims import Claim
from moe_jax.sweep.experiments import EXPERIMENTS, Experiment
from moe_jax.sweep.plots import plot_curves, plot_finals
from moe_jax.sweep.spec import POINTS_DIR, SEED, SWEEP_FILE, Sweep
from moe_jax.train import config_tree
from moe_jax.train import workdir as workdir_format
from moe_jax.train.metrics import METRICS_FILE, read_metrics

CURVES_PNG, FINALS_PNG = "curves.png", "finals.png"
# A metric is better lower when a part of its name says so (a loss, a violation, a mixed-language
# share, a cost).
_LOWER_IS_BETTER = ("ce", "loss", "maxvio", "drop", "perplexity", "mixed", "kl", "tokens", "params", "wall")


@dataclasses.dataclass
class Table:
    """The aggregated sweep: `axes` (the columns that tell configurations apart), a row per point,
    the metrics summarized, and each point's curves (metric -> {step: value})."""

    axes: list[str]
    rows: list[dict[str, Any]]
    metrics: list[str]
    curves: dict[str, dict[str, dict[int, float]]]
    baseline: dict[str, str] | None = None
    claims: tuple[Claim, ...] = ()

    def configurations(self) -> dict[tuple[tuple[str, str], ...], list[dict[str, Any]]]:
        """Finished rows by configuration (the axis values), in the rows' order."""
        groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
        for row in self.rows:
            if row["status"] == "done":
                groups.setdefault(tuple((a, row[a]) for a in self.axes), []).append(row)
        return groups


def lower_is_better(metric: str) -> bool:
    parts = metric.replace("/", "_").split("_")
    return any(word in parts for word in _LOWER_IS_BETTER)


def _status(point_dir: str, failed: bool) -> str:
    if workdir_format.read_done(point_dir) is not None:
        return "done"
    if failed:
        return "failed"
    return "not started" if not os.path.isdir(point_dir) else "unfinished"


def _run_columns(run_dir: str, prefix: str, metrics: Sequence[str], curves: dict[str, dict[int, float]]
                 ) -> dict[str, Any]:
    """Final and best of every eval metric and of `metrics` in a run's metrics.jsonl (curves kept)."""
    path = os.path.join(run_dir, METRICS_FILE)
    records = read_metrics(path) if os.path.exists(path) else []
    names = {k for r in records for k, v in r.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    names |= {m.removeprefix(prefix) for m in metrics if m.startswith(prefix)}
    columns: dict[str, Any] = {}
    for name in sorted(names):
        curve = {r["step"]: float(r[name]) for r in records if isinstance(r.get(name), (int, float))}
        if not curve:
            continue
        curves[prefix + name] = curve
        pick = min if lower_is_better(name) else max
        columns[f"{prefix}{name}/final"] = curve[max(curve)]
        columns[f"{prefix}{name}/best"] = pick(curve.values())
    return columns


def _graph_columns(point_dir: str) -> dict[str, Any]:
    """A graph's own results.csv, a column per stage and measure."""
    path = os.path.join(point_dir, RESULTS_CSV)
    if not os.path.exists(path):
        return {}
    columns = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            stage = row.pop("stage")
            columns.update({f"{stage}/{k}": float(v) for k, v in row.items() if _is_number(v)})
    return columns


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _tokens(run_dir: str, experiment: Experiment) -> int | None:
    saved = workdir_format.read_config(run_dir)
    if saved is None or experiment.graph:
        return None
    return run_tokens(run_dir, experiment.config_class.from_dict(saved))


def point_row(point_dir: str, experiment: Experiment, metrics: Sequence[str], *, failed: bool = False
              ) -> tuple[dict[str, Any], dict[str, dict[int, float]]]:
    """A point's columns (but its axis values) and its curves."""
    curves: dict[str, dict[int, float]] = {}
    row: dict[str, Any] = {"status": _status(point_dir, failed)}
    for prefix, folder in experiment.runs.items():
        run_dir = os.path.join(point_dir, folder)
        if experiment.graph:  # curves only: the graph's own table holds its measures
            _run_columns(run_dir, prefix, metrics, curves)
        else:
            row.update(_run_columns(run_dir, prefix, metrics, curves))
            row["tokens"] = _tokens(run_dir, experiment)
    if experiment.graph:
        row.update(_graph_columns(point_dir))
        stages = [os.path.join(point_dir, d) for d in sorted(os.listdir(point_dir))] if os.path.isdir(point_dir) else []
        seconds = [step_seconds(s) for s in stages if os.path.exists(os.path.join(s, workdir_format.STEP_FILE))]
        row["wall_s"] = sum(seconds) if seconds else None
    if os.path.exists(os.path.join(point_dir, workdir_format.STEP_FILE)):  # launched by a sweep: the point's time
        row["wall_s"] = step_seconds(point_dir) or None
    row.setdefault("wall_s", None)
    return row, curves


def collect_sweep(workdir: str, metrics: Sequence[str] = (), failed: Sequence[str] = ()) -> Table:
    """The rows of the sweep in `workdir` (its `sweep.json`), in the sweep's order."""
    sweep = Sweep.from_json(workdir_format.read_json(os.path.join(workdir, SWEEP_FILE)))
    metrics = list(metrics or sweep.metrics or sweep.spec.metrics)
    rows, curves = [], {}
    for point in sweep.points():
        row, curves[point.name] = point_row(os.path.join(workdir, POINTS_DIR, point.name), sweep.spec, metrics,
                                            failed=point.name in failed)
        rows.append({"point": point.name, **point.values, **row})
    return Table(sweep.axis_paths(), rows, metrics, curves, sweep.baseline_values(), sweep.claims)


def collect_runs(run_dirs: Sequence[str], metrics: Sequence[str] = ()) -> Table:
    """Rows of runs no sweep launched (single runs, R1 pipelines, distillations), their axes the
    config fields they differ in (`seed` apart); a run without a saved config is its own configuration."""
    configs = {d: workdir_format.read_json(os.path.join(d, PIPELINE_CONFIG_FILE)) or workdir_format.read_config(d)
               for d in run_dirs}
    flat = {d: config_tree.flatten(c) if c else {"run": os.path.basename(os.path.normpath(d))} for d, c in configs.items()}
    paths = sorted({p for f in flat.values() for p in f})
    differing = [p for p in paths if p != SEED and len({str(f.get(p)) for f in flat.values()}) > 1]
    experiment = _experiment_of(run_dirs)
    metrics = list(metrics or experiment.metrics)
    rows, curves = [], {}
    for d in run_dirs:
        row, curves[d] = point_row(d, experiment, metrics)
        rows.append({"point": d, **{p: str(flat[d].get(p)) for p in differing}, SEED: str(flat[d].get(SEED, "")),
                     **row})
    return Table(differing, rows, metrics, curves)


def run_folders(folder: str) -> list[str]:
    """The folders directly inside `folder` that hold a run or a graph (its saved config)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names
            if any(os.path.exists(os.path.join(folder, n, f)) for f in (workdir_format.CONFIG_FILE, PIPELINE_CONFIG_FILE))]


def _experiment_of(run_dirs: Sequence[str]) -> Experiment:
    """The kind of the runs by their files: an R1 pipeline, another graph, a GRPO or another run."""
    first = run_dirs[0]
    if os.path.exists(os.path.join(first, PIPELINE_CONFIG_FILE)):
        return EXPERIMENTS["r1_pipeline"]
    if os.path.exists(os.path.join(first, RESULTS_CSV)):
        return EXPERIMENTS["distill"]
    if os.path.isdir(os.path.join(first, "grpo")):
        return EXPERIMENTS["r1_zero"]
    saved = workdir_format.read_config(first) or {}
    return EXPERIMENTS["grpo" if "sampling" in saved else "pretrain"]


def summary_columns(table: Table) -> list[str]:
    """The numeric columns summarized over seeds: final values (not bests), graph measures, tokens, time."""
    skip = {"point", "status", SEED, *table.axes}
    columns: list[str] = []
    for row in table.rows:
        columns += [c for c, v in row.items() if c not in skip and c not in columns and not c.endswith("/best")
                    and isinstance(v, (int, float))]
    return columns


def write_csv(path: str, table: Table) -> None:
    columns = ["point", *table.axes, SEED, "status"]
    for row in table.rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="")
    writer.writeheader()
    for row in table.rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    workdir_format.write_text_atomically(path, buffer.getvalue())


def _csv_cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _fmt(value: float, like: float | None = None) -> str:
    """4 places below 10, 1 up to 10⁴, else 3 significant digits — by `like`'s size when given
    (a std or an interval is written as its mean is)."""
    if not math.isfinite(value):
        return "–"
    magnitude = abs(value if like is None or not math.isfinite(like) else like)
    return f"{value:.4f}" if magnitude < 10 else f"{value:.1f}" if magnitude < 1e4 else f"{value:.3g}"


def _label(configuration: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in configuration) or "(all)"


def _per_seed(rows: Sequence[Mapping[str, Any]], column: str) -> dict[str, float]:
    return {row[SEED]: float(row[column]) for row in rows if isinstance(row.get(column), (int, float))}


def markdown(table: Table, title: str) -> str:
    """Per configuration and metric: mean ± std, the 95% t-interval of the mean and n; the best
    configuration per metric starred; against the baseline, the paired-by-seed difference."""
    groups = table.configurations()
    columns = summary_columns(table)
    statuses = {s: sum(r["status"] == s for r in table.rows) for s in dict.fromkeys(r["status"] for r in table.rows)}
    lines = [f"# {title}", "", f"{len(table.rows)} points: " + ", ".join(f"{n} {s}" for s, n in statuses.items())
             + ". Means over the finished seeds of each configuration; the interval is the 95% Student-t interval "
             "of the mean; ★ marks the best configuration by mean.", "", *_overview(table, groups), "",
             *_claims(table, groups)]
    for column in columns:
        summaries = {c: summarize(list(_per_seed(rows, column).values())) for c, rows in groups.items()}
        summaries = {c: s for c, s in summaries.items() if s.n}
        if not summaries:
            continue
        pick = min if lower_is_better(column) else max
        best_mean = pick(s.mean for s in summaries.values())
        best = [c for c, s in summaries.items() if s.mean == best_mean]  # a tie stars nobody
        lines += [f"## {column} ({'lower' if lower_is_better(column) else 'higher'} is better)", ""]
        header = "| configuration | mean ± std | 95% CI | n |"
        baseline = _baseline(groups, table.baseline)
        if baseline is not None:
            header += " Δ vs baseline (paired by seed) | 95% CI of Δ | paired t-test p | verdict |"
        lines += [header, "|---" * (header.count("|") - 1) + "|"]
        for configuration, s in summaries.items():
            star = " ★" if best == [configuration] and len(summaries) > 1 else ""
            cells = [f"{_label(configuration)}{star}", f"{_fmt(s.mean)} ± {_fmt(s.std, s.mean)}",
                     f"[{_fmt(s.low, s.mean)}, {_fmt(s.high, s.mean)}]", str(s.n)]
            if baseline is not None:
                cells += _comparison(groups[configuration], groups[baseline], column, configuration == baseline)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if table.baseline and _baseline(groups, table.baseline) is None:
        lines.append(f"No finished configuration has the baseline {table.baseline}: no differences.\n")
    return "\n".join(lines)


def _overview(table: Table, groups: Mapping[tuple, Sequence[Mapping[str, Any]]]) -> list[str]:
    """One table of the headline columns (`_finals`): a row per configuration, mean ± std (n)."""
    columns = _finals(table)
    if not columns or not groups:
        return []
    lines = ["| configuration | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for configuration, rows in groups.items():
        cells = []
        for column in columns:
            s = summarize(list(_per_seed(rows, column).values()))
            cells.append(f"{_fmt(s.mean)} ± {_fmt(s.std, s.mean)} ({s.n})" if s.n else "")
        lines.append(f"| {_label(configuration)} | " + " | ".join(cells) + " |")
    return lines


def _claims(table: Table, groups: Mapping[tuple, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The sweep's claims, each judged per pair of configurations it compares (`claims.pairs`)."""
    if not table.claims:
        return []
    lines = ["## The claims", "", "| claim | a | b | Δ = a − b (paired by seed) | 95% CI of Δ | p | verdict |",
             "|---|---|---|---|---|---|---|"]
    for claim in table.claims:
        found = claims.pairs(claim, list(groups))
        if not found:
            lines.append(f"| {claim.says} | {claim.a} | {claim.b} | | | | no finished configuration to compare |")
        for a, b in found:
            b_metric = claim.b_metric or claim.metric
            difference, p, verdict = claims.judge(claim, _per_seed(groups[a], claim.metric),
                                                  _per_seed(groups[b], b_metric))
            lines.append(f"| {claim.says} (expected {claim.expect}) | {_label(a)}: {claim.metric} | {_label(b)}: "
                         f"{b_metric} | {_fmt(difference.mean)} ± {_fmt(difference.std, difference.mean)} "
                         f"(n={difference.n}) | [{_fmt(difference.low, difference.mean)}, "
                         f"{_fmt(difference.high, difference.mean)}] | {_fmt(p)} | **{verdict}** |")
    return [*lines, ""]


def _baseline(groups: Mapping[tuple, Any], baseline: Mapping[str, str] | None) -> tuple | None:
    if not baseline:
        return None
    matches = [c for c in groups if all(dict(c).get(k) == v for k, v in baseline.items())]
    return matches[0] if len(matches) == 1 else None


def _comparison(rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]], column: str,
                is_baseline: bool) -> list[str]:
    """Δ (mean ± std), its 95% CI, the paired t-test's p and the verdict the interval gives."""
    if is_baseline:
        return ["baseline", "", "", ""]
    mine, theirs = _per_seed(rows, column), _per_seed(baseline_rows, column)
    seeds = [s for s in mine if s in theirs]
    difference, p = paired_difference([mine[s] for s in seeds], [theirs[s] for s in seeds])
    return [f"{_fmt(difference.mean)} ± {_fmt(difference.std, difference.mean)} (n={difference.n})",
            f"[{_fmt(difference.low, difference.mean)}, {_fmt(difference.high, difference.mean)}]", _fmt(p),
            _verdict(difference, column)]


def _verdict(difference: Summary, column: str) -> str:
    if difference.n < 2:
        return "too few paired seeds"
    if difference.low <= 0 <= difference.high:
        return "within noise"
    better = (difference.mean < 0) == lower_is_better(column)
    return "better" if better else "worse"


def aggregate(workdir: str, run_dirs: Sequence[str] = (), *, metrics: Sequence[str] = (),
              failed: Sequence[str] = ()) -> Table:
    """Collect the sweep in `workdir` (or, given `run_dirs` or when `workdir` holds no sweep but run
    folders, those runs) and write `workdir`'s results.csv, results.md, curves.png and finals.png.
    Returns the table."""
    if not run_dirs and not os.path.exists(os.path.join(workdir, SWEEP_FILE)):
        run_dirs = run_folders(workdir)
        if not run_dirs:
            raise FileNotFoundError(f"{workdir} holds no {SWEEP_FILE} and no run folders (with config.json or "
                                    f"{PIPELINE_CONFIG_FILE}). Fix: give a sweep's folder, or --runs=<run folders>")
    if run_dirs:
        table, title = collect_runs(run_dirs, metrics), f"{len(run_dirs)} runs"
    else:
        table = collect_sweep(workdir, metrics, failed)
        title = f"Sweep {os.path.basename(os.path.normpath(workdir))}"
    os.makedirs(workdir, exist_ok=True)
    write_csv(os.path.join(workdir, RESULTS_CSV), table)
    workdir_format.write_text_atomically(os.path.join(workdir, RESULTS_MD), markdown(table, title))
    groups = table.configurations()
    plot_curves(os.path.join(workdir, CURVES_PNG), table.metrics, {
        _label(c): [table.curves[row["point"]] for row in rows] for c, rows in groups.items()})
    plot_finals(os.path.join(workdir, FINALS_PNG), _finals(table), {_label(c): rows for c, rows in groups.items()})
    return table


def _finals(table: Table) -> list[str]:
    """The final values drawn: the plotted metrics' (a run's), else a graph's accuracy columns."""
    columns = summary_columns(table)
    finals = [f"{m}/final" for m in table.metrics if f"{m}/final" in columns]
    return finals or [c for c in columns if "/accuracy" in c]
