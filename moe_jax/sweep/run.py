"""A sweep is a graph of independent points (`moe_jax.pipeline.executor.run_independent`), each
the experiment's command in `DIR/points/<name>/`, then its aggregation (`moe_jax.sweep.aggregate`)
— declared like the R1 pipeline, whose results table also follows its graph.

A point's key is its experiment and flags (cadence flags left out), so rerunning the sweep skips
finished points, resumes killed ones, and runs only the points an added seed or axis value brings;
a point whose flags changed is moved to `DIR/superseded/` and run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from moe_jax.config_flags import CONFIG_PREFIX
from moe_jax.pipeline.executor import Pending, Step, run_independent, step_key
from moe_jax.sweep.experiments import get_experiment
from moe_jax.sweep.launch import PointConfig, core_shares, run_local
from moe_jax.sweep.slurm import SlurmOptions, run_slurm
from moe_jax.sweep.spec import POINTS_DIR, SHARED_DIR, SWEEP_DIR, SWEEP_FILE, Point, Sweep
from moe_jax.sweep.view import SweepView
from moe_jax.train import config_tree
from moe_jax.train.workdir import require_directory, write_text_atomically

LAUNCHERS = ("local", "slurm")  # and print, which runs nothing: `commands`
_ACCELERATOR_FILES = ("/dev/nvidia0", "/dev/accel0")  # a GPU or TPU: points would share its memory


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    """The points' folders by name, and the error of each point that did not finish."""

    point_dirs: Mapping[str, str]
    failures: Mapping[str, BaseException]


def default_parallel() -> int:
    """Points at once for `local`: one per core on a CPU machine; one on an accelerator, whose
    memory each JAX process would otherwise claim most of."""
    if any(os.path.exists(path) for path in _ACCELERATOR_FILES):
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def point_config(experiment: str, point: Point, reads: Sequence[str] = ()) -> PointConfig:
    cadence = config_tree.not_identity_fields(get_experiment(experiment).config_class)
    is_cadence = [flag.lstrip("-").split("=", 1)[0].removeprefix(CONFIG_PREFIX) in cadence for flag in point.flags]
    return PointConfig(experiment, tuple(f for f, c in zip(point.flags, is_cadence) if not c),
                       tuple(f for f, c in zip(point.flags, is_cadence) if c), tuple(reads))


def _elsewhere(step_dir: str, inputs: Mapping[str, str]) -> None:
    raise RuntimeError(f"{step_dir}: a sweep's point runs as its own process, through a launcher")


def shared_steps(sweep: Sweep) -> list[Step]:
    """A step per shared run and seed (`Sweep.shared`), in `DIR/shared/`."""
    return [Step(f"{SHARED_DIR}/{p.name}", _elsewhere, point_config(experiment, p))
            for experiment, p in sweep.shared_points()]


def point_steps(sweep: Sweep) -> list[Step]:
    """A step per point (computed by the launcher, not in this process); a point that names a
    shared run has that run's key in its own, so a changed shared run redoes its points."""
    shared = {f"{SWEEP_DIR}/{step.name}": step_key(step.config, []) for step in shared_steps(sweep)}
    steps = []
    for p in sweep.points():
        reads = [key for folder, key in shared.items() if any(folder in flag for flag in p.flags)]
        steps.append(Step(f"{POINTS_DIR}/{p.name}", _elsewhere, point_config(sweep.experiment, p, reads)))
    return steps


def commands(sweep: Sweep, workdir: str) -> list[str]:
    """Every shared run's and point's command, in order, as `--launcher=print` prints them."""
    return [shlex.join(step.config.argv(os.path.join(workdir, step.name)))
            for step in (*shared_steps(sweep), *point_steps(sweep))]


def run_sweep(sweep: Sweep, workdir: str, *, launcher: str = "local", parallel: int | None = None,
              slurm: SlurmOptions | None = None, out: TextIO = sys.stdout) -> SweepOutcome:
    """Run (or resume, or skip) every point of `sweep` under `workdir/points/`; returns where they
    are and which failed (each failure is reported on `out` with its log's last lines; the others
    run on)."""
    sweep.validate()
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher={launcher}: one of {', '.join(LAUNCHERS)}")
    if parallel is not None and parallel < 1:
        raise ValueError(f"--parallel={parallel}: give at least 1 (or leave it out: one point per core)")
    require_directory(workdir)
    os.makedirs(workdir, exist_ok=True)
    write_text_atomically(os.path.join(workdir, SWEEP_FILE), json.dumps(sweep.to_json(), indent=2) + "\n")
    parallel = parallel or default_parallel()
    errors: dict[str, BaseException] = {}
    steps = point_steps(sweep)
    for phase in (shared_steps(sweep), steps):  # the shared runs first: the points read them
        if phase and not errors:
            errors = _run_phase(phase, workdir, launcher, parallel, slurm, out)
    out.flush()
    return SweepOutcome({step.name.removeprefix(POINTS_DIR + "/"): os.path.join(workdir, step.name) for step in steps},
                        {name.removeprefix(POINTS_DIR + "/"): error for name, error in errors.items()})


def _run_phase(steps: Sequence[Step], workdir: str, launcher: str, parallel: int, slurm: SlurmOptions | None,
               out: TextIO) -> dict[str, BaseException]:
    """Run (or resume, or skip) `steps`, independent of each other; returns their failures."""
    view = SweepView([step.name for step in steps], out)

    def launch(todo: Sequence[Pending]) -> Mapping[str, float | BaseException | None]:
        started = {pending.step.name for pending in todo}
        view.states.update({step.name: "skipped" for step in steps if step.name not in started})
        how = (f"{min(parallel, len(todo))} at a time{_cores(parallel)}" if launcher == "local"
               else "as one SLURM job array")
        out.write(f"{view.summary()} ({len(steps) - len(todo)} finished before; {len(todo)} to run, {how})\n")
        if launcher == "slurm":
            return run_slurm(todo, workdir, slurm or SlurmOptions(), view)
        return run_local(todo, parallel, view)

    _, errors = run_independent(workdir, steps, launch)
    if all(state == "queued" for state in view.states.values()):  # nothing was launched
        view.states.update(dict.fromkeys(view.states, "skipped"))
        out.write(f"{view.summary()}: every point finished before\n")
    out.writelines(f"FAILED {name}: {error}\n" for name, error in errors.items())
    if errors:
        out.write(view.summary() + "\n")
    return errors


def _cores(parallel: int) -> str:
    shares = core_shares(parallel)
    return f", {len(shares[0])} core(s) each" if shares[0] else ""
