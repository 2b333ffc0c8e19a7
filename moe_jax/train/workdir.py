"""The workdir format, owned here and nowhere else. A run's folder holds:

    config.json        the run's config (written before the first step; a rerun must agree)
    tokenizer.json     a copy of the run's Hugging Face tokenizer (none for the built-in "char")
    LOCK               held by the run using the workdir (`moe_jax.train.lock`)
    checkpoints/<step>/{model,optimizer,data}   Orbax checkpoints (`moe_jax.train.checkpoint`)
    checkpoints_damaged/<step>/                 checkpoints that failed to load or verify, kept
    config_changes.jsonl                        settings changed on resume (`--allow_config_change`)
    metrics.jsonl, tensorboard/, metrics.png    the run's record (`moe_jax.train.run_log`)
    DONE               written last, when the run has finished: its final step and metrics

A graph's folder (`moe_jax.pipeline.executor`) holds a folder per step, each with its
`stage.json` (key, inputs, config, outputs' digests, attempts), and `superseded/` for steps
computed under another key; its results tables are `results.md|csv|png`, and its `DONE` is
written when every step ran and the tables are written (a sweep's point is done by it).

`--init_from`, `export_hf.py` and the pipeline read runs through these functions, so a finished
run is recognised (`read_done`) without building a model.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from moe_jax.parallel.distributed import is_lead
from moe_jax.train.experiment_config import RunConfig, config_differences

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
DONE_FILE = "DONE"
STEP_FILE = "stage.json"
SUPERSEDED_DIR = "superseded"


class ConfigConflictError(ValueError):
    """The workdir holds a run whose config differs from the one asked for."""


def require_directory(path: str) -> None:
    """Refuse a `--workdir` that is a file (a folder is created where it is missing)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"--workdir={path} is a file. Fix: give a directory (it is created if missing)")


def write_text_atomically(path: str, text: str) -> None:
    """Write `text` to `path` whole or not at all (a kill mid-write leaves the old file)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON file's object, or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_config(workdir: str) -> dict[str, Any] | None:
    """The saved `config.json` of `workdir` as a dict, or None when there is none."""
    return read_json(os.path.join(workdir, CONFIG_FILE))


def check_config(cfg: RunConfig, workdir: str, allowed: Sequence[str] = ()) -> list[str]:
    """Refuse to mix runs: a saved `config.json` must agree with `cfg` on the run's identity
    (`config_tree.not_identity` fields aside: cadence, layout, budgets), except at the paths `allowed` names (a path or a part, e.g. `optimizer`); returns
    those allowed differences."""
    saved = read_config(workdir)
    if saved is None:
        return []
    try:  # a field added since the run was saved takes its default, as in `from_dict`
        saved = type(cfg).from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass  # compared as saved: the differences name what no longer fits
    differences = config_differences(saved, cfg)
    changed = [line for line in differences if _is_allowed(line.split(":", 1)[0], allowed)]
    refused = [line for line in differences if line not in changed]
    if refused:
        raise ConfigConflictError(
            f"{workdir} holds a run with a different config:\n  " + "\n  ".join(refused)
            + f"\nFix: resume it with its own config (--config={os.path.join(workdir, CONFIG_FILE)}); to go on "
              "from its last checkpoint with changed settings, name them: --allow_config_change="
              + ",".join(line.split(":", 1)[0] for line in refused)
              + "; or give this run a new --workdir (--init_from=<that workdir> starts from its weights)")
    return changed


def _is_allowed(path: str, allowed: Sequence[str]) -> bool:
    return any(path == a or path.startswith(a + ".") for a in allowed)


def record_config_changes(workdir: str, step: int | None, changes: Sequence[str]) -> None:
    """Append the settings a resumed run changed (and from which checkpoint) to the run's record;
    a finished run that goes on is no longer finished."""
    record = {"at_checkpoint": step, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "changes": list(changes)}
    with open(os.path.join(workdir, CONFIG_CHANGES_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
    unmark_done(workdir)


def prepare(cfg: RunConfig, workdir: str) -> None:
    """Write `config.json` and the copy of the tokenizer (from the lead process; `check_config` first)."""
    os.makedirs(workdir, exist_ok=True)
    if is_lead():
        write_text_atomically(os.path.join(workdir, CONFIG_FILE), cfg.to_json())
        source, copy = tokenizer_file(cfg.tokenizer), os.path.join(workdir, TOKENIZER_FILE)
        if source is not None and not os.path.exists(copy):  # the run keeps the tokenizer it started with
            shutil.copyfile(source, copy + ".tmp")
            os.replace(copy + ".tmp", copy)


def tokenizer_file(name_or_path: str) -> str | None:
    """The `tokenizer.json` a tokenizer setting names (a file, or a folder holding one, as
    `load_tokenizer` reads it); None for the built-in "char"."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    return path if name_or_path != "char" and os.path.isfile(path) else None


def tokenizer_path(workdir: str, cfg: RunConfig) -> str:
    """What `load_tokenizer` should read for the run in `workdir`: its own copy when it has one."""
    copy = os.path.join(workdir, TOKENIZER_FILE)
    return copy if os.path.isfile(copy) else cfg.tokenizer


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


def damaged_dir(workdir: str) -> str:
    return os.path.join(workdir, DAMAGED_DIR)


def has_checkpoints(workdir: str) -> bool:
    """Whether `workdir` holds a checkpoint step (without opening it)."""
    directory = checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def checkpoint_location(path: str) -> tuple[str, int | None]:
    """(checkpoint directory, step or None for the latest) of what `--init_from` names: a run's
    workdir, its `checkpoints/` directory, or one step's directory inside it."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return os.path.join(path, CHECKPOINT_DIR), None
    name = os.path.basename(path)
    if name.isdigit():
        return os.path.dirname(path), int(name)
    return path, None


def mark_done(workdir: str, step: int, metrics: dict[str, Any]) -> None:
    """Write `DONE` (the final step and its scalar metrics): the last file a finished run writes."""
    record = {"step": step, "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}}
    write_text_atomically(os.path.join(workdir, DONE_FILE), json.dumps(record, indent=2, sort_keys=True))


def unmark_done(workdir: str) -> None:
    """A finished run or graph that goes on is no longer finished: remove its `DONE`."""
    if os.path.exists(os.path.join(workdir, DONE_FILE)):
        os.remove(os.path.join(workdir, DONE_FILE))


def read_done(workdir: str) -> dict[str, Any] | None:
    """`{"step", "finished_at", "metrics"}` of a finished run, or None when it has not finished."""
    return read_json(os.path.join(workdir, DONE_FILE))
