"""The run's progress line, drawn by tqdm (`tqdm.autonotebook`: a widget in a notebook):

     40%|########            | 120/300 [00:10<01:30, 2.00step/s, loss 1.23 | tokens/s 5.40k]

On a terminal tqdm rewrites the line in place. Elsewhere (CI logs, files, captured stderr) each
refresh becomes a line of its own, at most every `every_s` seconds plus the final one, so logs
stay short and never hold a carriage return.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np
from tqdm import autonotebook as tqdm_auto
from tqdm import std as tqdm_std

# metric key -> label shown on the line.
DEFAULT_KEYS: dict[str, str] = {"loss": "loss", "tokens_per_s": "tokens/s"}
NOTEBOOK_REFRESH_S = 0.5


def format_number(x: float) -> str:
    """4 significant digits (a loss of 0.004 stays 0.004), with tqdm's k/M/G suffixes from 1000 up."""
    return tqdm_std.tqdm.format_sizeof(x) if abs(x) >= 1000 else f"{x:.4g}"


class _LinePerRefresh:
    """A file for tqdm that turns each in-place refresh ('\\r' + line) into one printed line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """`update(step, metrics)` after each logged step; `close()` at the end."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO = sys.stderr,
                 every_s: float = 10.0, *, keys: Mapping[str, str] | Sequence[str] = DEFAULT_KEYS):
        self.keys = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
        isatty = getattr(stream, "isatty", None)
        options: dict[str, Any] = {"total": total_steps, "initial": start_step, "unit": "step",
                                   "dynamic_ncols": True}
        if isatty and isatty():
            self.bar = tqdm_std.tqdm(file=stream, **options)
        elif stream is sys.stderr and tqdm_auto.tqdm is not tqdm_std.tqdm:  # a notebook: its widget
            self.bar = tqdm_auto.tqdm(mininterval=NOTEBOOK_REFRESH_S, **options)
        else:
            # leave=False: `close` prints the final line itself, once (`_LinePerRefresh` drops the
            # blank line tqdm clears with).
            self.bar = tqdm_std.tqdm(file=_LinePerRefresh(stream), mininterval=every_s, ascii=True, leave=False,
                                     **options)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        shown = []
        for key, label in self.keys.items():
            value = (metrics or {}).get(key)
            if value is not None and not isinstance(value, bool) and np.size(value) == 1:
                shown.append(f"{label} {format_number(float(np.asarray(value)))}")
        self.bar.set_postfix_str(" | ".join(shown), refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if not self.bar.leave and self.bar.last_print_n < self.bar.n:  # the last update was throttled
            self.bar.refresh()
        self.bar.close()
