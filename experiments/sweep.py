"""Ablation sweeps: any experiment × config axes × seeds, every point its experiment's own command
in DIR/points/<name>/, run in parallel here or as a SLURM job array, resumable; then DIR/results.csv
(a row per point), results.md (mean ± std, 95% t-intervals, paired differences from --baseline),
curves.png and finals.png.

    python experiments/sweep.py --workdir=/tmp/topk --experiment=pretrain --axis=model.top_k=1,2 \\
        --seeds=0,1,2 --config.steps=300                              # 6 points, 2 at a time on 2 cores
    python experiments/sweep.py --workdir=/tmp/lb --experiment=pretrain --seeds=0,1,2 \\
        --variant='loss_free:' --variant='aux_loss:--config.model.aux_loss_coef=0.01 --config.model.router_bias_rate=0' \\
        --baseline=aux_loss
    python experiments/sweep.py --workdir=/tmp/s --sweep=studies/my_sweep.py --launcher=print   # the commands
    python experiments/sweep.py --workdir=/tmp/s --sweep=my_sweep.json --launcher=slurm --slurm.partition=gpu
    python experiments/sweep.py --aggregate=/tmp/topk                  # the tables again (e.g. --metrics=eval/ce)
    python experiments/sweep.py --aggregate=/tmp/r1_seeds --runs=/tmp/r1_s0,/tmp/r1_s1,/tmp/r1_s2
    python experiments/sweep.py --aggregate=/tmp/my_runs              # every run folder inside it

Flags this script does not know (`--config.*`, `--recipe`, `--scale`, `--init_from`, ...) are the
experiment's, given to every point. `--zip=path=v1,v2` flags form one axis together (their values
go in step). Rerunning the same command skips finished points and resumes killed ones; the exit
status is 0 only when every point finished.
"""

from __future__ import annotations

import signal
import sys

import jax
from absl import app, flags

from moe_jax.errors import InputError
from moe_jax.experiment_main import USER_ERRORS, quiet_libraries
from moe_jax.sweep.aggregate import aggregate
from moe_jax.sweep.experiments import EXPERIMENTS
from moe_jax.sweep.run import LAUNCHERS, commands, run_sweep
from moe_jax.sweep.slurm import SlurmOptions
from moe_jax.sweep.spec import Axis, Sweep, load_sweep, parse_variant

flags.DEFINE_string("workdir", None, "the sweep's folder: sweep.json, points/<name>/, results.*")
flags.DEFINE_enum("experiment", None, list(EXPERIMENTS), "what every point runs (experiments/<name>.py)")
flags.DEFINE_multi_string("axis", [], "path=v1,v2,...: one axis of the product (a --config path)")
flags.DEFINE_multi_string("zip", [], "path=v1,v2,...: these flags together are one axis, zipped")
flags.DEFINE_multi_string("variant", [], "name:--flag=v --flag=w ...: a named set of flags (an axis of its own)")
flags.DEFINE_list("seeds", ["0"], "the seeds (--config.seed) of every configuration")
flags.DEFINE_string("sweep", None, "a sweep file (JSON, or Python with sweep() or SWEEP); the flags above "
                    "add to it")
flags.DEFINE_string("baseline", None, "the configuration the table compares against: a variant's name or "
                    "path=value of an axis")
flags.DEFINE_enum("launcher", "local", [*LAUNCHERS, "print"], "local: parallel processes here; print: print each point's "
                  "command; slurm: one SLURM job array (submitit)")
flags.DEFINE_integer("parallel", None, "local: points at once, each on its share of the cores (default: one "
                     "per core on a CPU machine, one on a GPU/TPU)")
flags.DEFINE_list("metrics", [], "metrics to draw and summarize first (default: the experiment's)")
flags.DEFINE_string("aggregate", None, "only write the tables and plots of the sweep in this folder (or of the "
                    "run folders in it, or, with --runs, of those runs)")
flags.DEFINE_list("runs", [], "with --aggregate: run folders no sweep launched, grouped by their configs")
flags.DEFINE_string("slurm.partition", None, "slurm: the partition")
flags.DEFINE_integer("slurm.time_min", 60, "slurm: each task's time limit (minutes)")
flags.DEFINE_integer("slurm.gpus_per_node", 0, "slurm: GPUs per task's node")
flags.DEFINE_integer("slurm.cpus_per_task", 2, "slurm: cores per task")
flags.DEFINE_integer("slurm.array_parallelism", 16, "slurm: array tasks at once")
flags.DEFINE_enum("slurm.cluster", "slurm", ["slurm", "local", "debug"], "slurm: submitit's executor ('local' "
                  "runs the array's jobs on this machine)")
FLAGS = flags.FLAGS
_EXPERIMENT_FLAGS: list[str] = []  # the flags given to every point


def parse_flags(argv: list[str]) -> list[str]:
    """This script's flags by absl; every other `--flag` is the experiment's (kept for the points)."""
    own, rest = [argv[0]], []
    goes_to = own
    for arg in argv[1:]:
        if arg.startswith("-"):
            name = arg.lstrip("-").split("=", 1)[0]
            known = name in FLAGS or (name.startswith("no") and name[2:] in FLAGS)
            goes_to = own if known else rest
            goes_to.append(arg)
        elif goes_to is rest and rest and "=" not in rest[-1]:  # `--config.steps 300`: one flag, as a point takes it
            rest[-1] += "=" + arg
        else:
            goes_to.append(arg)
    _EXPERIMENT_FLAGS.extend(rest)
    return app.parse_flags_with_usage(own)


def sweep_from_flags() -> Sweep:
    base = load_sweep(FLAGS.sweep) if FLAGS.sweep else None
    experiment = FLAGS.experiment or (base.experiment if base else None)
    if experiment is None:
        raise InputError(f"give --experiment ({', '.join(EXPERIMENTS)}) or a --sweep file")
    axes = [Axis.parse(a) for a in FLAGS.axis]
    if FLAGS.zip:
        zipped = [Axis.parse(z) for z in FLAGS.zip]
        axes.append(Axis.of({a.paths[0]: [v[0] for v in a.values] for a in zipped}))
    if not all(s.lstrip("-").isdigit() for s in FLAGS.seeds):
        raise InputError(f"--seeds={','.join(FLAGS.seeds)}: give whole numbers, e.g. --seeds=0,1,2")
    seeds = tuple(int(s) for s in FLAGS.seeds) if FLAGS["seeds"].present or not base else base.seeds
    return Sweep(experiment, (*(base.base if base else ()), *_EXPERIMENT_FLAGS),
                 (*(base.axes if base else ()), *axes), {**(base.variants if base else {}),
                                                          **dict(map(parse_variant, FLAGS.variant))},
                 seeds, FLAGS.baseline or (base.baseline if base else None), base.claims if base else (),
                 base.shared if base else {}, base.metrics if base else ())


def _stop(signum: int, frame) -> None:
    raise KeyboardInterrupt  # the launcher stops the points (each saves) and the sweep ends


def main(argv: list[str]) -> None:
    del argv
    jax.config.update("jax_platforms", "cpu")  # the launcher computes nothing: the accelerators are the points'
    quiet_libraries()
    try:
        if FLAGS.aggregate:
            table = aggregate(FLAGS.aggregate, FLAGS.runs, metrics=FLAGS.metrics)
            print(f"{len(table.rows)} rows: {FLAGS.aggregate}/results.md|csv, curves.png, finals.png")
            return
        if not FLAGS.workdir:
            raise InputError("give --workdir (the sweep's folder) or --aggregate=<folder>")
        sweep = sweep_from_flags()
        if FLAGS.launcher == "print":
            sweep.validate()
            print("\n".join(commands(sweep, FLAGS.workdir)))
            return
        signal.signal(signal.SIGTERM, _stop)
        slurm = SlurmOptions(FLAGS["slurm.partition"].value, FLAGS["slurm.time_min"].value,
                             FLAGS["slurm.gpus_per_node"].value, FLAGS["slurm.cpus_per_task"].value,
                             FLAGS["slurm.array_parallelism"].value, FLAGS["slurm.cluster"].value)
        outcome = run_sweep(sweep, FLAGS.workdir, launcher=FLAGS.launcher, parallel=FLAGS.parallel, slurm=slurm)
        aggregate(FLAGS.workdir, metrics=FLAGS.metrics, failed=list(outcome.failures))
        print(f"results: {FLAGS.workdir}/results.md")
    except (*USER_ERRORS, ValueError) as e:
        sys.stderr.write(f"FATAL {e}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("stopped: the running points saved a checkpoint; rerun the same command to resume\n")
        sys.exit(130)
    if outcome.failures:
        sys.stderr.write(f"FATAL {len(outcome.failures)} of {len(outcome.point_dirs)} points did not finish: "
                         f"{', '.join(outcome.failures)}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
