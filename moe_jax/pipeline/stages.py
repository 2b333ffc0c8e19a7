"""A pipeline of stages, each a folder `DIR/<stage>/` keyed by what it computes from.

A stage's key is a hash of its settings (its config, as JSON) and of the keys of the stages it
reads (marin's executor idea, without its cluster): a stage whose folder holds `DONE` under the
same key is skipped; one interrupted under the same key is resumed (its run picks up its own
checkpoints); one whose key changed is moved aside to `DIR/superseded/<stage>-<old key>` and redone.
A changed stage changes the key of everything that reads it, so exactly that much is redone.

`DIR/<stage>/stage.json` holds the key, the input keys and the wall time each attempt spent.
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

import jax
from absl import logging
from jax.experimental import multihost_utils

from moe_jax.train import workdir as workdir_format

STAGE_FILE = "stage.json"
SUPERSEDED_DIR = "superseded"
# Config fields added after stage folders existed, with the value that computes what was computed
# before them: a settings leaf at such a path (at any depth) holding that value is left out of the
# key, so adding a field does not redo every finished stage of every folder.
ADDED_FIELDS = {"loop.max_seconds": 0.0}


@dataclasses.dataclass(frozen=True)
class Stage:
    """`run(stage_dir, input_dirs)` computes the stage into `stage_dir` and ends by writing its
    `DONE` (`moe_jax.train.workdir.mark_done`; a driver run does this itself). `settings` is
    everything its output depends on besides its inputs (JSON-able)."""

    name: str
    inputs: tuple[str, ...]
    settings: Mapping[str, Any]
    run: Callable[[str, Mapping[str, str]], Any]


def stage_key(settings: Mapping[str, Any], input_keys: Sequence[str]) -> str:
    """sha256 of the settings (canonical JSON, `ADDED_FIELDS` at their old value left out) and the
    input stages' keys, in input order."""
    blob = json.dumps({"settings": _without_added_fields(settings), "inputs": list(input_keys)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _without_added_fields(tree: Any, path: str = "") -> Any:
    if not isinstance(tree, Mapping):
        return tree
    kept = {}
    for name, value in tree.items():
        child = f"{path}.{name}" if path else name
        if not any((child == f or child.endswith("." + f)) and value == v for f, v in ADDED_FIELDS.items()):
            kept[name] = _without_added_fields(value, child)
    return kept


def read_stage(stage_dir: str) -> dict[str, Any] | None:
    return workdir_format.read_json(os.path.join(stage_dir, STAGE_FILE))


def is_lead() -> bool:
    """Whether this process writes the pipeline's files (the others wait at `sync`)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here until all have arrived (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _write_stage(stage_dir: str, record: Mapping[str, Any]) -> None:
    if is_lead():
        workdir_format.write_json_atomically(os.path.join(stage_dir, STAGE_FILE), json.dumps(record, indent=2, sort_keys=True))


def _supersede(workdir: str, stage_dir: str, old_key: str) -> str:
    """Move a stage folder computed under another key aside (never delete a run's data)."""
    target = os.path.join(workdir, SUPERSEDED_DIR, f"{os.path.basename(stage_dir)}-{old_key}")
    if is_lead():
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):  # the same old key superseded before: keep the newer copy
            shutil.rmtree(target)
        os.replace(stage_dir, target)
    sync(f"supersede {stage_dir}")
    return target


def run_stages(workdir: str, stages: Sequence[Stage], *, only: Sequence[str] = ()) -> dict[str, str]:
    """Run the stages in order (each after its inputs), skipping those done under their key.
    `only`: stop after these stages (and what they read) are done. Returns {stage: key}."""
    keys: dict[str, str] = {}
    wanted = _needed(stages, only) if only else {s.name for s in stages}
    for stage in stages:
        if stage.name not in wanted:
            continue
        missing = [name for name in stage.inputs if name not in keys]
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {missing}, which do not run before it")
        key = keys[stage.name] = stage_key(stage.settings, [keys[name] for name in stage.inputs])
        stage_dir = os.path.join(workdir, stage.name)
        record = read_stage(stage_dir)
        if record is not None and record["key"] == key and workdir_format.read_done(stage_dir) is not None:
            logging.info("stage %s: done (key %s), skipped", stage.name, key)
            continue
        if os.path.exists(stage_dir) and (record is None or record["key"] != key):
            old = "unkeyed" if record is None else record["key"]
            why = ("has no stage.json (not this pipeline's, or killed before it was written)" if record is None
                   else f"was computed under another config or inputs (key {old} -> {key})")
            logging.warning("stage %s: its folder %s; it is now %s and the stage is redone", stage.name, why,
                            _supersede(workdir, stage_dir, old))
            record = None
        if is_lead():
            os.makedirs(stage_dir, exist_ok=True)
        sync(f"stage dir {stage.name}")
        resuming = record is not None  # an attempt under this key began here: its run resumes
        attempts = record["attempts"] if resuming else []
        record = {"stage": stage.name, "key": key, "inputs": {name: keys[name] for name in stage.inputs},
                  "settings": stage.settings, "attempts": attempts}
        _write_stage(stage_dir, record)
        logging.info("stage %s: %s (key %s)", stage.name, "resuming" if resuming else "running", key)
        start = time.time()
        stage.run(stage_dir, {name: os.path.join(workdir, name) for name in stage.inputs})
        _write_stage(stage_dir, {**record, "attempts": [*attempts, {"seconds": time.time() - start}]})
    return keys


def stage_seconds(stage_dir: str) -> float:
    """Wall seconds the stage's finished attempts took (an attempt killed midway is not counted)."""
    record = read_stage(stage_dir)
    return 0.0 if record is None else sum(a["seconds"] for a in record["attempts"])


def _needed(stages: Sequence[Stage], only: Sequence[str]) -> set[str]:
    by_name = {s.name: s for s in stages}
    unknown = sorted(set(only) - set(by_name))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(by_name)}")
    needed, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].inputs
    return needed
