"""What a training loop reports as it goes: `metrics.jsonl` and TensorBoard events (written by
process 0 only), the progress line, and the PNG plot of the curves once the run ends."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from moe_jax.train.metrics import METRICS_FILE, MetricsWriter, plot_metrics
from moe_jax.train.progress import Progress

PLOT_FILE = "metrics.png"


class RunLog:
    """`write(step, metrics)` each step; `close()` in a `finally`; `plot()` after a clean end."""

    def __init__(self, workdir: str, *, steps: int, start: int, is_lead: bool,
                 progress_keys: Mapping[str, str] | None = None, plot_keys: Sequence[str] | None = None):
        self.workdir, self.is_lead, self.plot_keys = workdir, is_lead, plot_keys
        self.writer = MetricsWriter(workdir, resume_step=start) if is_lead else None
        self.progress = Progress(steps, start_step=start, every_s=10.0,
                                 **({"keys": progress_keys} if progress_keys else {}))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.writer:
            self.writer.write(step, metrics)
        self.progress.update(step, metrics)

    def close(self) -> None:
        self.progress.close()
        if self.writer:
            self.writer.close()

    def plot(self) -> None:
        if self.is_lead:
            plot_metrics(os.path.join(self.workdir, METRICS_FILE), os.path.join(self.workdir, PLOT_FILE),
                         keys=self.plot_keys)
