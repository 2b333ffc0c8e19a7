"""One executor for every graph of runs: the R1 pipeline, a distillation, Table 6 and sweeps.

A graph is a list of `Step`s, each a name (its folder `DIR/<name>/`), a function that computes the
step into its folder, the config it computes from and the steps it reads (marin's `ExecutorStep`,
without its cluster). A step's key hashes the *identity* of its config (`config_tree.identity`:
cadence, layout and budgets left out, declared once on the config classes) and its inputs' keys.

`run_steps(DIR, steps)` runs them in order, and `run_independent(DIR, steps, launch)` hands steps
that read no other step (a sweep's points) to a launcher at once; both own these guarantees:

- a step whose folder holds `DONE` under the same key is skipped; one begun under the same key is
  resumed (its run picks up its own checkpoints); one whose key changed is moved aside to
  `DIR/superseded/<name>-<old key>` and redone — and so is everything that reads it;
- a step holds its folder's lock while it runs (`moe_jax.train.lock`: the run inside it takes the
  same lock again; a launched step's process takes it itself), so two graphs on one folder never
  compute one step twice;
- a step is done only when it wrote `DONE`: one that returns without it (a preempted run) stops
  the graph with `StepIncomplete`, so nothing downstream reads a half-made input;
- the files a step declares as `outputs` are recorded (sizes and sha256) when it finishes and
  checked before any step reads them; a missing or changed file is an `InputError` naming it;
- an input is checked before anything is moved aside, so a broken input redoes nothing.

A folder keyed before today's identity rule (e.g. its key hashed a cadence field) whose recorded
config agrees with today's on the identity is re-keyed in place, once, and logged — never retrained.

`DIR/<name>/stage.json` holds the key, the input keys, the config, the outputs' digests and the
wall time each finished attempt spent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging

from moe_jax.errors import InputError
from moe_jax.parallel.distributed import is_lead, sync
from moe_jax.train import config_tree
from moe_jax.train import workdir as workdir_format
from moe_jax.train.lock import lock_workdir

_DIGEST_CHUNK = 1 << 20


class StepIncomplete(RuntimeError):
    """A step returned without finishing (e.g. its run was preempted): the graph stops there."""


@dataclasses.dataclass(frozen=True)
class Step:
    """`fn(step_dir, input_dirs)` computes the step into `step_dir` and ends by writing its `DONE`
    (`workdir.mark_done`; a driver run does this itself). `config` is everything its output
    depends on besides its inputs (config dataclasses, mappings and scalars); `outputs` are the
    files or folders (relative to `step_dir`) that steps reading it depend on: those present
    when it finishes are recorded."""

    name: str
    fn: Callable[[str, Mapping[str, str]], Any]
    config: Any = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


def step_key(config: Any, input_keys: Sequence[str]) -> str:
    """sha256 of the config's identity (canonical JSON) and the input steps' keys, in input order."""
    return _hash(config_tree.identity(config), input_keys)


def _hash(identity: Any, input_keys: Sequence[str]) -> str:
    blob = json.dumps({"settings": identity, "inputs": list(input_keys)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_step(step_dir: str) -> dict[str, Any] | None:
    return workdir_format.read_json(os.path.join(step_dir, workdir_format.STEP_FILE))


def step_keys(step_dir: str) -> list[str]:
    """The keys the folder's contents were computed under: today's and those it was re-keyed from."""
    record = read_step(step_dir) or {}
    return [key for key in [record.get("key"), *record.get("rekeyed_from", [])] if key]


def step_seconds(step_dir: str) -> float:
    """Wall seconds the step's finished attempts took (an attempt killed midway is not counted)."""
    record = read_step(step_dir)
    return 0.0 if record is None else sum(a["seconds"] for a in record["attempts"])


def digest(path: str) -> dict[str, Any]:
    """What a reader of `path` depends on: a file's size and sha256; a folder's files' sizes."""
    if os.path.isdir(path):
        sizes = {}
        for root, _, files in os.walk(path):
            for name in files:
                full = os.path.join(root, name)
                sizes[os.path.relpath(full, path)] = os.path.getsize(full)
        return {"files": dict(sorted(sizes.items()))}
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_DIGEST_CHUNK):
            sha.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": sha.hexdigest()}


def check_outputs(step_dir: str) -> None:
    """Refuse a finished step whose recorded outputs are missing or changed (InputError naming the
    file and the fix)."""
    record = read_step(step_dir) or {}
    fix = (f"Fix: restore it, or delete {step_dir} so that the step is redone (with every step that reads "
           "it) on the next run")
    for name, recorded in record.get("outputs", {}).items():
        path = os.path.join(step_dir, name)
        if not os.path.exists(path):
            raise InputError(f"{path} is gone: step {os.path.basename(step_dir)!r} wrote it and later steps read it. "
                             f"{fix}")
        now = digest(path)
        if now != recorded:
            changed = _first_difference(recorded, now)
            raise InputError(f"{path} changed since step {os.path.basename(step_dir)!r} wrote it ({changed}). {fix}")


def _first_difference(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    if "files" in recorded and "files" in now:
        for name in sorted(set(recorded["files"]) | set(now["files"])):
            before, after = recorded["files"].get(name), now["files"].get(name)
            if before != after:
                return f"{name}: {before} -> {after} bytes" if before and after else f"{name}: " + (
                    "missing" if after is None else "new")
    if recorded.get("bytes") != now.get("bytes"):
        return f"{recorded.get('bytes')} -> {now.get('bytes')} bytes"
    return "same size, other contents"


def _write_record(step_dir: str, record: Mapping[str, Any]) -> None:
    if is_lead():
        workdir_format.write_text_atomically(os.path.join(step_dir, workdir_format.STEP_FILE),
                                             json.dumps(record, indent=2, sort_keys=True, default=str))


def _supersede(workdir: str, step_dir: str, old_key: str) -> str:
    """Move a step folder computed under another key aside (never delete a run's data)."""
    target = os.path.join(workdir, workdir_format.SUPERSEDED_DIR, f"{os.path.basename(step_dir)}-{old_key}")
    with lock_workdir(step_dir):  # nobody may be computing it while it moves
        if is_lead():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):  # the same old key superseded before: keep the newer copy
                shutil.rmtree(target)
            os.replace(step_dir, target)
        sync(f"supersede {step_dir}")
    return target


def _rekeyable(record: Mapping[str, Any], step: Step, input_keys: Mapping[str, Sequence[str]]) -> bool:
    """Whether a folder keyed by an older rule computed what `step` computes today: its recorded
    config equals today's on the identity, and its inputs were computed under their keys."""
    recorded = record.get("settings")
    dropped = config_tree.non_identity_paths(step.config)
    same_config = config_tree.without_paths(recorded, dropped) == config_tree.identity(step.config)
    return same_config and all(record.get("inputs", {}).get(name) in input_keys[name] for name in step.inputs)


@dataclasses.dataclass(frozen=True)
class Pending:
    """A step to compute: its key, folder, the record an earlier attempt under this key left (None
    for a fresh start) and its inputs' keys and folders."""

    step: Step
    key: str
    step_dir: str
    record: Mapping[str, Any] | None
    input_keys: Mapping[str, str]
    input_dirs: Mapping[str, str]


def run_steps(workdir: str, steps: Sequence[Step], *, only: Sequence[str] = ()) -> dict[str, str]:
    """Run the steps in order (each after its inputs), skipping those done under their key.
    `only`: stop after these steps (and what they read) are done. Returns {step: key}."""
    graph = _Graph(workdir)
    wanted = _needed(steps, only) if only else {s.name for s in steps}
    for step in steps:
        if step.name not in wanted:
            continue
        pending = graph.decide(step)
        if pending is not None:
            with lock_workdir(pending.step_dir):
                record = _begin(pending)
                start = time.time()
                step.fn(pending.step_dir, pending.input_dirs)
                sync(f"step {step.name} returned")
                _finish(pending, record, time.time() - start)
    return graph.keys


def run_independent(workdir: str, steps: Sequence[Step],
                    launch: Callable[[Sequence[Pending]], Mapping[str, float | BaseException | None]]
                    ) -> tuple[dict[str, str], dict[str, BaseException]]:
    """Steps that read no other step (a sweep's points), decided as `run_steps` decides (skipped,
    resumed, superseded) and then computed together by `launch(pending)`, however it likes
    (parallel processes, a job array), which returns each step's wall seconds, the error it
    ended with, or None when another process (a second graph on the folder) computed it — its
    record stands. A step computed by another process must take its folder's lock itself (an
    experiment's run does), so it is not taken here. One process only. Returns ({step: key},
    {step: error}) — a step that failed or did not write `DONE` is in the second."""
    graph = _Graph(workdir)
    todo, records = [], {}
    for step in steps:
        if step.inputs:
            raise ValueError(f"step {step.name!r} reads {list(step.inputs)}: run_independent takes steps that read "
                             "no other step")
        pending = graph.decide(step)
        if pending is not None:
            records[step.name] = _begin(pending)
            todo.append(pending)
    outcomes = launch(todo) if todo else {}
    errors: dict[str, BaseException] = {}
    for pending in todo:
        outcome = outcomes.get(pending.step.name, StepIncomplete(f"step {pending.step.name!r} was not launched"))
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is None:
                _check_done(pending)
            else:
                _finish(pending, records[pending.step.name], outcome)
        except Exception as e:  # noqa: BLE001 -- one failed point is reported; the others are recorded
            errors[pending.step.name] = e
    return graph.keys, errors


class _Graph:
    """The keys decided so far, and every key a step's folder answers to (today's and re-keyed ones)."""

    def __init__(self, workdir: str):
        workdir_format.require_directory(workdir)
        self.workdir = workdir
        self.keys: dict[str, str] = {}
        self.known: dict[str, list[str]] = {}

    def decide(self, step: Step) -> Pending | None:
        """`step`'s key; None when its folder is done under it (skipped), else the step to compute
        (a folder of another key moved aside first, its inputs' outputs checked)."""
        keys, workdir = self.keys, self.workdir
        missing = [name for name in step.inputs if name not in keys]
        if missing:
            raise ValueError(f"step {step.name!r} reads {missing}, which do not run before it")
        key = keys[step.name] = step_key(step.config, [keys[name] for name in step.inputs])
        step_dir = os.path.join(workdir, step.name)
        # Every process decides from the files as the lead left them, before the lead writes again.
        sync(f"read step {step.name}")
        record, exists, done = read_step(step_dir), os.path.exists(step_dir), workdir_format.read_done(step_dir)
        sync(f"decided step {step.name}")
        if record is not None and record["key"] != key and _rekeyable(record, step, self.known):
            logging.info("step %s: re-keyed %s -> %s (computed under an older key rule; its config agrees with "
                         "today's)", step.name, record["key"], key)
            record = {**record, "key": key, "rekeyed_from": [record["key"], *record.get("rekeyed_from", [])],
                      "inputs": {name: keys[name] for name in step.inputs}}
            _write_record(step_dir, record)
        self.known[step.name] = [key, *(record or {}).get("rekeyed_from", [])]
        if record is not None and record["key"] == key and done is not None:
            logging.info("stage %s: done (key %s), skipped", step.name, key)
            return None
        for name in step.inputs:  # every input ran (or was skipped) above: done; its outputs must be intact
            check_outputs(os.path.join(workdir, name))
        if exists and (record is None or record["key"] != key):
            old = "unkeyed" if record is None else record["key"]
            why = ("has no stage.json (not this graph's, or killed before it was written)" if record is None
                   else f"was computed under another config or inputs (key {old} -> {key})")
            logging.warning("stage %s: its folder %s; it is now %s and the step is redone", step.name, why,
                            _supersede(workdir, step_dir, old))
            record = None
        return Pending(step, key, step_dir, record, {name: keys[name] for name in step.inputs},
                       {name: os.path.join(workdir, name) for name in step.inputs})


def _begin(pending: Pending) -> dict[str, Any]:
    """Record the attempt's key, inputs and config in the step's `stage.json` (and return it)."""
    previous = pending.record or {}
    step = pending.step
    os.makedirs(pending.step_dir, exist_ok=True)
    record = {"stage": step.name, "key": pending.key, "inputs": dict(pending.input_keys),
              "settings": config_tree.as_json(step.config), "attempts": previous.get("attempts", []),
              "rekeyed_from": previous.get("rekeyed_from", [])}
    _write_record(pending.step_dir, record)
    logging.info("stage %s: %s (key %s)", step.name, "resuming" if pending.record is not None else "running",
                 pending.key)
    return record


def _check_done(pending: Pending) -> None:
    step_dir, name = pending.step_dir, pending.step.name
    if workdir_format.read_done(step_dir) is None:
        raise StepIncomplete(f"step {name!r} stopped before it finished ({step_dir} has no DONE; e.g. its run "
                             "was preempted and saved): no step that reads it ran. Fix: rerun the same command; "
                             "it resumes this step")


def _finish(pending: Pending, record: Mapping[str, Any], seconds: float) -> None:
    """A step is done only when it wrote `DONE`; record its outputs' digests and the attempt's time."""
    _check_done(pending)
    step_dir = pending.step_dir
    outputs = {output: digest(os.path.join(step_dir, output)) for output in pending.step.outputs
               if os.path.exists(os.path.join(step_dir, output))}
    _write_record(step_dir, {**record, "outputs": outputs, "attempts": [*record["attempts"], {"seconds": seconds}]})


def _needed(steps: Sequence[Step], only: Sequence[str]) -> set[str]:
    by_name = {s.name: s for s in steps}
    unknown = sorted(set(only) - set(by_name))
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; the steps are {list(by_name)}")
    needed, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].inputs
    return needed
