"""Notice of preemption: SIGTERM (what schedulers and `kill` send before SIGKILL) asks the loop to
checkpoint and leave at the end of the current step instead of dying mid-step.

On a multi-process run JAX's own preemption service (started by `jax.distributed.initialize`)
catches the signal and agrees on a common step (`CheckpointManager.reached_preemption`); a Python
handler there would take the signal away from it, so this one is installed only when the run is a
single process.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

import jax
import orbax.checkpoint as ocp

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the package promises 3.10
    from typing_extensions import Self


class PreemptionWatcher:
    """`with PreemptionWatcher() as watcher: ... if watcher.requested: save and stop`."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.requested = True

    def stop_requested(self, step: int, manager: ocp.CheckpointManager) -> bool:
        """Whether the loop should checkpoint `step` and leave: SIGTERM was seen here, or (on a
        multi-process run) JAX's preemption service has reached its sync point at `step`."""
        return self.requested or manager.reached_preemption(step)

    def __enter__(self) -> Self:
        # Signal handlers can only be set from the main thread (not, e.g., a notebook worker).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
