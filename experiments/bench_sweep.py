"""Points per minute of a sweep of tiny points at several `--parallel`, each launched the way
`experiments/sweep.py` launches them (`--parallel=N`: N processes, each pinned to its share of
the cores), into fresh folders, the settings interleaved repeat by repeat (1, 2, 1, 2, ...) so that
a drift of the machine's speed falls on both. Prints one JSON line with the platform.

    python experiments/bench_sweep.py                       # 4 points of 40 pretraining steps, 1 vs 2
    python experiments/bench_sweep.py --parallel=1,2,4 --points=8 --steps=100
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import tempfile
import time

import jax
from absl import app, flags

from moe_jax.sweep.run import run_sweep
from moe_jax.sweep.spec import Axis, Sweep

flags.DEFINE_list("parallel", ["1", "2"], "the --parallel settings compared")
flags.DEFINE_integer("points", 4, "points per sweep (seeds of one tiny pretraining config)")
flags.DEFINE_integer("steps", 40, "training steps of each point")
flags.DEFINE_integer("repeats", 3, "timed sweeps per setting, interleaved (the median is reported)")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    jax.config.update("jax_platforms", "cpu")  # the launcher's own process computes nothing
    sweep = Sweep("pretrain", base=(f"--config.steps={FLAGS.steps}", "--config.batch_size=8",
                                    f"--config.loop.eval_every={FLAGS.steps}", "--config.loop.eval_problems=16"),
                  axes=(Axis.parse("model.top_k=2"),), seeds=tuple(range(FLAGS.points)))
    settings = [int(p) for p in FLAGS.parallel]
    per_minute: dict[int, list[float]] = {p: [] for p in settings}
    for _ in range(FLAGS.repeats):
        for parallel in settings:
            with tempfile.TemporaryDirectory() as workdir:
                start = time.perf_counter()
                outcome = run_sweep(sweep, workdir, parallel=parallel, out=io.StringIO())
                seconds = time.perf_counter() - start
            if outcome.failures:
                raise RuntimeError(f"points failed: {outcome.failures}")
            per_minute[parallel].append(FLAGS.points * 60 / seconds)
    print(json.dumps({"platform": f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores "
                                  f"({platform.processor() or platform.system()})",
                      "points": FLAGS.points, "steps": FLAGS.steps, "repeats": FLAGS.repeats,
                      "points_per_minute": {str(p): round(statistics.median(v), 2) for p, v in per_minute.items()},
                      "all_runs": {str(p): [round(x, 2) for x in v] for p, v in per_minute.items()}}))


if __name__ == "__main__":
    app.run(main)
