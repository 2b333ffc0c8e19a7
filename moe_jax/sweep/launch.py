"""Running a sweep's points: each is its experiment's own command (`PointConfig.argv`), written to
`DIR/points/<name>/command` and run with its output in `DIR/points/<name>/output.log`.

`run_local` runs up to `parallel` points at once as child processes, each limited to its share of
the cores (`taskset`: CPU affinity, which XLA's thread pools follow), so that N points do not
fight over them; on CPU a program's floating-point results depend on how many cores it may use,
and the `taskset` is part of the point's command, so the command reproduces them. A point whose
folder another process holds (a second sweep on the same DIR, or one on another machine sharing
it) waits for it rather than running twice. Stopping the sweep (Ctrl-C, SIGTERM) stops its points
the way a preemption does (SIGTERM: they save and exit), and rerunning it resumes them; a sweep
killed outright leaves its points running, and its rerun waits for them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from moe_jax.experiment_main import EXIT_LOCKED
from moe_jax.pipeline.executor import Pending, read_step
from moe_jax.sweep.experiments import get_experiment
from moe_jax.sweep.spec import SWEEP_DIR
from moe_jax.sweep.view import SweepView
from moe_jax.train import config_tree
from moe_jax.train.lock import holder
from moe_jax.train.workdir import read_done, write_text_atomically

COMMAND_FILE, LOG_FILE = "command", "output.log"
POLL_S = 1.0
LOG_TAIL_LINES = 8  # of a failed point's output, in the report


@dataclasses.dataclass(frozen=True)
class PointConfig:
    """What a point computes: its experiment and flags (its step's key); the flags that change only
    how it runs (`--config.loop.eval_every`, …: `cadence`) are not part of the key."""

    experiment: str
    flags: tuple[str, ...]
    cadence: tuple[str, ...] = config_tree.not_identity((), why="flags of fields outside the run's identity")
    reads: tuple[str, ...] = ()  # the keys of the shared runs its flags name (`{sweep}/shared/…`)

    def argv(self, workdir: str) -> list[str]:
        """The command, `{sweep}` in a flag standing for the sweep's folder (a point's or shared
        run's workdir is two levels below it)."""
        sweep_dir = os.path.dirname(os.path.dirname(os.path.abspath(workdir)))
        return [sys.executable, get_experiment(self.experiment).script_path, f"--workdir={os.path.abspath(workdir)}",
                *(flag.replace(SWEEP_DIR, sweep_dir) for flag in (*self.flags, *self.cadence))]


class PointFailed(RuntimeError):
    """A point's command exited with an error; the message holds its log's last lines."""


def pinned(argv: Sequence[str], cores: Sequence[int] = ()) -> list[str]:
    """`argv` run on `cores` only (`taskset -c`), or as it is when it may use every core."""
    return ["taskset", "-c", ",".join(map(str, cores)), *argv] if cores else list(argv)


def log_tail(point_dir: str, lines: int = LOG_TAIL_LINES) -> str:
    path = os.path.join(point_dir, LOG_FILE)
    if not os.path.exists(path):
        return "(no output)"
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines)).rstrip()


def core_shares(parallel: int) -> list[tuple[int, ...]]:
    """This process's cores split into `parallel` shares (none when one point has them all or
    there are fewer cores than points: then nothing is restricted)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if parallel <= 1 or len(cores) < parallel or not shutil.which("taskset"):
        return [()] * max(parallel, 1)
    size = len(cores) // parallel
    return [tuple(cores[i * size:(i + 1) * size]) for i in range(parallel)]


def _done_elsewhere(pending: Pending) -> bool:
    """Another process finished this point under the same key while this one waited."""
    record = read_step(pending.step_dir) or {}
    return record.get("key") == pending.key and read_done(pending.step_dir) is not None


def start_point(pending: Pending, cores: tuple[int, ...] = ()) -> subprocess.Popen:
    """Write the point's `command` and start it, its output appended to its `output.log`."""
    argv = pinned(pending.step.config.argv(pending.step_dir), cores)
    write_text_atomically(os.path.join(pending.step_dir, COMMAND_FILE), shlex.join(argv) + "\n")
    with open(os.path.join(pending.step_dir, LOG_FILE), "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # a Ctrl-C reaches the sweep, which stops them in order


def run_local(todo: Sequence[Pending], parallel: int, view: SweepView) -> dict[str, float | BaseException | None]:
    """Run the points, `parallel` at a time; returns each point's seconds, its error, or None for a
    point another process finished while it waited."""
    shares = core_shares(parallel)
    queue = collections.deque(todo)
    running: dict[str, tuple[Pending, subprocess.Popen, float, tuple[int, ...]]] = {}
    outcomes: dict[str, float | BaseException | None] = {}
    try:
        while queue or running:
            _start_ready(queue, running, shares, view, outcomes)
            for name, (pending, process, start, cores) in list(running.items()):
                code = process.poll()
                spec = get_experiment(pending.step.config.experiment)
                if code is None:
                    view.running(name, pending.step_dir, spec.runs)
                    continue
                del running[name]
                shares.append(cores)
                if code == 0:
                    outcomes[name] = time.time() - start
                    finished = read_done(pending.step_dir) is not None
                    view.set(name, "done" if finished else "stopped",
                             f"{outcomes[name]:.0f} s" if finished else "exited before it finished: a rerun resumes it")
                elif code == EXIT_LOCKED:  # another process took it first: wait for that one
                    queue.append(pending)
                else:
                    outcomes[name] = PointFailed(f"exit status {code}; the end of {pending.step_dir}/{LOG_FILE}:\n"
                                                 f"{log_tail(pending.step_dir)}")
                    view.set(name, "failed", f"exit status {code}")
            time.sleep(POLL_S if running or queue else 0)
    except KeyboardInterrupt:
        _stop(running, view)
        raise
    return outcomes


def _start_ready(queue: collections.deque, running: dict, shares: list[tuple[int, ...]], view: SweepView,
                 outcomes: dict[str, float | BaseException | None]) -> None:
    """Start queued points while cores are free; a point another process holds waits (and is done
    when that process finishes it)."""
    for _ in range(len(queue)):
        pending = queue.popleft()
        name = pending.step.name
        busy = holder(pending.step_dir)
        if busy is not None:
            view.set(name, "waiting", f"in use by {busy}")
            queue.append(pending)
            continue
        if _done_elsewhere(pending):
            outcomes[name] = None  # its record is the other process's
            view.set(name, "done", "by another process")
            continue
        if not shares:
            queue.append(pending)
            continue
        cores = shares.pop(0)
        running[name] = (pending, start_point(pending, cores), time.time(), cores)
        view.set(name, "running", f"on cores {','.join(map(str, cores))}" if cores else "")


def _stop(running: Mapping[str, tuple], view: SweepView) -> None:
    """SIGTERM every running point (each saves a checkpoint and exits) and wait for them."""
    for name, (_, process, _, _) in running.items():
        process.send_signal(signal.SIGTERM)
        view.set(name, "stopping")
    for _, process, _, _ in running.values():
        process.wait()
