"""A one-line training progress report: step, bar, steps/s, ETA and a few metrics.

    step 120/300 [=======>            ] 40% | 1.2 steps/s | ETA 2m30s | loss 1.234 | tokens/s 5.4k

On a terminal the line is rewritten in place ('\\r'); elsewhere (CI logs, files, notebooks' captured
stderr) a full line is printed at most every `every_s` seconds, plus the first and the final step,
so logs stay short. Throughput is measured from the first `update`, which excludes the first
step's compilation time from the rate and the ETA.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from typing_extensions import Self

# metric key -> label shown on the line.
DEFAULT_KEYS: dict[str, str] = {"loss": "loss", "tokens_per_s": "tokens/s"}


def format_number(x: float) -> str:
    """4 significant digits, with k/M/G/T suffixes from a thousand up: 1.234, 5.4k, 12.3M."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.4g}"


def format_duration(seconds: float) -> str:
    """45s, 2m30s, 1h02m."""
    s = math.floor(seconds + 0.5)  # An int even for NumPy floats.
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """`update(step, metrics)` after each step (or each logged step); `close()` at the end."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO = sys.stderr,
                 every_s: float = 30.0, *, keys: Mapping[str, str] | Sequence[str] = DEFAULT_KEYS,
                 width: int = 20, clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self.start_step = start_step
        self.stream = stream
        self.every_s = every_s
        self.keys = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
        self.width = width
        self.clock = clock
        isatty = getattr(stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._t0: float | None = None  # Time and step of the first update: the rate's origin.
        self._s0 = start_step
        self._last_print = -float("inf")
        self._pending: str | None = None  # Latest line not yet printed (non-TTY throttling).
        self._open_len = 0  # Length of the TTY line being rewritten; 0 when none is open.

    def line(self, step: int, metrics: Mapping[str, Any], now: float) -> str:
        """The progress line for `step` at time `now` (the first update must have happened)."""
        total = max(self.total_steps, 1)
        frac = min(max(step / total, 0.0), 1.0)
        filled = int(frac * self.width)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * (self.width - filled - 1)
        parts = [f"step {step}/{self.total_steps} [{bar}] {frac:4.0%}"]
        elapsed = now - self._t0 if self._t0 is not None else 0.0
        rate = (step - self._s0) / elapsed if elapsed > 0 and step > self._s0 else None
        if rate is None:
            parts += ["? steps/s", "ETA ?"]
        else:
            parts.append(f"{format_number(rate)} steps/s" if rate >= 1 else f"{1 / rate:.3g} s/step")
            parts.append(f"ETA {format_duration(max(self.total_steps - step, 0) / rate)}")
        for key, label in self.keys.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                parts.append(f"{label} {format_number(float(value))}")
            elif hasattr(value, "item") and getattr(value, "size", 0) == 1:  # NumPy/JAX scalar.
                parts.append(f"{label} {format_number(float(value.item()))}")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        now = self.clock()
        if self._t0 is None:
            self._t0, self._s0 = now, step
        text = self.line(step, metrics or {}, now)
        final = step >= self.total_steps
        if self.tty:
            # Rewrite in place, padding over a longer previous line.
            self.stream.write("\r" + text.ljust(self._open_len))
            self.stream.flush()
            self._open_len = len(text)
            if final:
                self._end_tty_line()
        elif final or now - self._last_print >= self.every_s:
            self._print(text, now)
        else:
            self._pending = text

    def _print(self, text: str, now: float) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_print = now
        self._pending = None

    def _end_tty_line(self) -> None:
        if self._open_len:
            self.stream.write("\n")
            self.stream.flush()
            self._open_len = 0

    def close(self) -> None:
        """End the line: a newline on a terminal; elsewhere print the last update if throttled."""
        if self.tty:
            self._end_tty_line()
        elif self._pending is not None:
            self._print(self._pending, self.clock())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
