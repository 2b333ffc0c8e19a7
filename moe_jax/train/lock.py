"""One run per workdir: an exclusive lock held for the run's life.

`<workdir>/LOCK` is locked with `fcntl.flock`, which the kernel releases when the holding process
exits in any way (a crash or SIGKILL included), so a lock left by a dead run is never stale: the
next run takes it over and says whose it was. The file also names the holder (host, pid, start
time) for the message a second run exits with. On a multi-process run the lead process alone
takes the lock and tells the others whether it got it, so none of them hangs waiting. A process
that holds a workdir may enter it again (a graph step holds its folder while the run inside it
takes the same lock).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from moe_jax.parallel.distributed import is_lead
from moe_jax.train.workdir import mark_done, require_directory, unmark_done

LOCK_FILE = "LOCK"
_HELD: dict[str, int] = {}  # the workdirs this process holds -> how many `with` blocks hold each


class WorkdirLockedError(RuntimeError):
    """Another live run holds this workdir."""


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace")
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLockedError(
                f"{workdir} is in use by another run: {_describe(_holder(fd))} (lock file {path}). Fix: "
                "wait for that run to finish or stop it, or give this run another --workdir") from None
        previous = _holder(fd)
        if previous:
            logging.info("%s: took over the lock of a run that is no longer running (%s)", workdir,
                         _describe(previous))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder; only a dead run's name stays
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def holder(workdir: str) -> str | None:
    """Who holds `workdir` now (host, pid, start), or None when no live run does (a launcher asks
    before starting a run there; the answer may be stale by the time the run starts)."""
    path = os.path.join(workdir, LOCK_FILE)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_holder(fd))
    finally:
        os.close(fd)  # releases the probe's shared lock, if it got it
    return None


@contextlib.contextmanager
def lock_workdir(workdir: str) -> Iterator[None]:
    """Hold `workdir` for the `with` block; a second run on it raises WorkdirLockedError at once,
    naming the holder. Creates the workdir (only) if needed."""
    require_directory(workdir)
    held = os.path.realpath(workdir)
    if held in _HELD:  # this process holds it already
        _HELD[held] += 1
        try:
            yield
        finally:
            _HELD[held] -= 1
        return
    with _locked(workdir):
        _HELD[held] = 1
        try:
            yield
        finally:
            del _HELD[held]


@contextlib.contextmanager
def _locked(workdir: str) -> Iterator[None]:
    if jax.process_count() == 1:
        os.makedirs(workdir, exist_ok=True)
        with _flock(workdir):
            yield
        return
    with contextlib.ExitStack() as stack:
        error = None
        if is_lead():
            os.makedirs(workdir, exist_ok=True)
            try:
                stack.enter_context(_flock(workdir))
            except Exception as e:  # noqa: BLE001 -- whatever it is, the others must hear of it, not hang
                error = e
        got_it = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if error is not None:
            raise error
        if not got_it:
            raise WorkdirLockedError(f"{workdir} is in use by another run (the lead process could not lock it)")
        yield


@contextlib.contextmanager
def command_workdir(workdir: str) -> Iterator[None]:
    """The folder of a command of several runs (a graph of steps, `r1_zero.py`'s two runs): held for
    the command's life as a run holds its own, its `DONE` removed as it starts and written when the
    block ends without an error — the command finished (what a sweep's point waits for)."""
    with lock_workdir(workdir):
        if is_lead():
            unmark_done(workdir)
        yield
        if is_lead():
            mark_done(workdir, 0, {})
