"""A sweep's figures: metrics over steps, a line per configuration with a band of ± one std over
its seeds (`curves.png`), and final values as bars with 95% t-interval error bars (`finals.png`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moe_jax.stats import summarize

_COLUMNS = 3


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(panels / _COLUMNS))
    fig = Figure(figsize=(5 * min(max(panels, 1), _COLUMNS), 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, rows


def _save(fig, path: str) -> None:
    fig.savefig(path + ".tmp", format="png", dpi=90)
    os.replace(path + ".tmp", path)


def plot_curves(path: str, metrics: Sequence[str], curves: Mapping[str, Sequence[Mapping[str, Mapping[int, float]]]]
                ) -> None:
    """`curves`: configuration -> its seeds' {metric: {step: value}}; the mean over the seeds that
    logged a step, and ± their std."""
    fig, rows = _figure(len(metrics))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, _COLUMNS, i + 1)
        for label, seeds in curves.items():
            per_seed = [s[metric] for s in seeds if metric in s]
            steps = sorted({step for curve in per_seed for step in curve})
            if not steps:
                continue
            values = [[curve[step] for curve in per_seed if step in curve] for step in steps]
            mean = np.array([np.mean(v) for v in values])
            std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
            (line,) = ax.plot(steps, mean, label=label, linewidth=1.2)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    _save(fig, path)


def plot_finals(path: str, columns: Sequence[str], groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """`groups`: configuration -> its finished rows; a bar per configuration at the mean of each
    column, its error bar the 95% t-interval of the mean (none for one seed)."""
    fig, rows = _figure(len(columns))
    labels = list(groups)
    for i, column in enumerate(columns):
        ax = fig.add_subplot(rows, _COLUMNS, i + 1)
        summaries = [summarize([r[column] for r in groups[label] if isinstance(r.get(column), (int, float))])
                     for label in labels]
        means = [s.mean if s.n else 0.0 for s in summaries]
        errors = [s.high - s.mean if s.n > 1 else 0.0 for s in summaries]
        ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(column, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
