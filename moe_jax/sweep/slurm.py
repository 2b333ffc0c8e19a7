"""The points as one SLURM job array through submitit (`pip install submitit`, the `sweep` extra):
each array task runs its point's command, so a point may itself be a multi-host run (give its
`--num_processes`/`--coordinator` flags in the sweep's base and `tasks_per_node`/`nodes` here).
`cluster="local"` runs the same jobs through submitit's local executor (how the tests run it)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import time
from collections.abc import Sequence

from moe_jax.pipeline.executor import Pending
from moe_jax.sweep.experiments import get_experiment
from moe_jax.sweep.launch import COMMAND_FILE, LOG_FILE, POLL_S, PointFailed, log_tail
from moe_jax.sweep.view import SweepView
from moe_jax.train.workdir import read_done, write_text_atomically

JOBS_DIR = "slurm"  # submitit's own files (pickled jobs, its logs), under the sweep's DIR


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """The array's resources: `array_parallelism` tasks at once on `partition` for `time_min`
    minutes, each with `gpus_per_node` GPUs and `cpus_per_task` cores."""

    partition: str | None = None
    time_min: int = 60
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    array_parallelism: int = 16
    cluster: str = "slurm"  # or "local" / "debug": submitit's executors that run on this machine


def run_command(argv: Sequence[str], point_dir: str) -> int:
    """An array task: the point's command, its output appended to the point's log; its exit status."""
    with open(os.path.join(point_dir, LOG_FILE), "ab") as log:
        return subprocess.run(list(argv), stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def run_slurm(todo: Sequence[Pending], sweep_dir: str, options: SlurmOptions, view: SweepView
              ) -> dict[str, float | BaseException]:
    """Submit the points as one job array and follow it; returns each point's seconds or its error."""
    import submitit  # an optional extra: only this launcher needs it

    executor = submitit.AutoExecutor(folder=os.path.join(sweep_dir, JOBS_DIR), cluster=options.cluster)
    executor.update_parameters(timeout_min=options.time_min, gpus_per_node=options.gpus_per_node,
                               cpus_per_task=options.cpus_per_task, slurm_array_parallelism=options.array_parallelism,
                               **({"slurm_partition": options.partition} if options.partition else {}))
    start = time.time()
    with executor.batch():
        jobs = {}
        for pending in todo:
            argv = pending.step.config.argv(pending.step_dir)
            write_text_atomically(os.path.join(pending.step_dir, COMMAND_FILE), shlex.join(argv) + "\n")
            jobs[pending.step.name] = (pending, executor.submit(run_command, argv, pending.step_dir))
    outcomes: dict[str, float | BaseException] = {}
    while len(outcomes) < len(jobs):
        for name, (pending, job) in jobs.items():
            if name in outcomes:
                continue
            if not job.done():
                if job.state in ("RUNNING", "COMPLETING"):
                    view.running(name, pending.step_dir, get_experiment(pending.step.config.experiment).runs)
                continue
            outcomes[name] = _outcome(pending, job, time.time() - start)
            failed = isinstance(outcomes[name], BaseException)
            view.set(name, "failed" if failed else "done", f"job {job.job_id}")
        time.sleep(POLL_S)
    return outcomes


def _outcome(pending: Pending, job, seconds: float) -> float | BaseException:
    try:
        code = job.result()
    except Exception as e:  # noqa: BLE001 -- the job itself failed (cancelled, timed out, node lost)
        return PointFailed(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1]}")
    if code != 0 or read_done(pending.step_dir) is None:
        return PointFailed(f"exit status {code} (job {job.job_id}); the end of {pending.step_dir}/{LOG_FILE}:\n"
                           f"{log_tail(pending.step_dir)}")
    return seconds
