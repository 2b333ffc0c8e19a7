"""Run metrics on disk: `metrics.jsonl` (one JSON object per line, always with "step") next to
TensorBoard event files, a PNG plot of the curves, and model-FLOPs utilisation (MFU).

The JSON lines are the source of truth a script or notebook reads back (`read_metrics`); the
TensorBoard events are for watching a run live. Both are resume-aware: a run restored from the
checkpoint at step S re-runs steps S+1…, so whatever the killed run logged after S is dropped from
the JSON lines and hidden in TensorBoard (`purge_step`), leaving one value per step.

Nothing here imports JAX: values may be JAX/NumPy scalars or arrays (converted with NumPy) and
devices are anything with a `device_kind` (and `platform`) attribute, so the module is cheap to
import from notebooks and plotting scripts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Keys `plot_metrics` draws by default, in this order, followed by every `eval/...` key.
DEFAULT_PLOT_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "maxvio_mean")


def _to_jsonable(key: str, value: Any) -> Any:
    """A Python float/int/bool/str, or a (nested) list of numbers for per-layer values.

    Values arrive as JAX or NumPy scalars and arrays; `json` only knows Python types."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"metric {key!r}: cannot write a value of dtype {array.dtype} ({value!r})")
    return array.item() if array.ndim == 0 else array.tolist()


class MetricsWriter:
    """Writes `workdir/metrics.jsonl` and TensorBoard events under `workdir/tensorboard/`.

    `resume_step=0` starts a fresh run (an existing metrics file is truncated). `resume_step=S>0`
    continues a run restored from the checkpoint at step S: lines with step > S (logged by the
    killed run, about to be re-run) are dropped, by an atomic rewrite of the file, and TensorBoard
    hides that run's events from step S+1 on. Multi-host runs should create it on process 0 only.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0):
        from tensorboardX import SummaryWriter  # Imported here: only writers need it.

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        if resume_step > 0:
            _truncate_after(self.path, resume_step)
        # Held open for the run's lifetime and closed by `close()`, not a `with` block.
        self._file = open(self.path, "a" if resume_step > 0 else "w", encoding="utf-8")  # noqa: SIM115
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                 purge_step=resume_step + 1 if resume_step > 0 else None)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one line `{"step": step, **metrics}` and the matching TensorBoard scalars.

        Numeric values become `key` scalars, 1-D lists (per-layer values) `key/layer_i` scalars;
        strings and nested lists go to the JSON line only. The line is flushed at once so that a
        killed run leaves every step it logged up to its last checkpoint. A NaN/inf is written as
        Python's `json` writes it (`NaN`, `Infinity`), which `read_metrics` reads back."""
        step = int(step)
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if key != "step":
                record[key] = _to_jsonable(key, value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (bool, int, float)):
                self._tb.add_scalar(key, float(value), step)
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                for i, v in enumerate(value):
                    self._tb.add_scalar(f"{key}/layer_{i}", float(v), step)

    def flush(self) -> None:
        self._file.flush()
        self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self._tb.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _truncate_after(path: str, resume_step: int) -> None:
    """Keep the lines of `path` with step <= `resume_step`; temp file + `os.replace`, so a kill
    during the rewrite leaves either the old or the new file, never half of one."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order. Blank lines, lines that are not a JSON
    object with a "step" (such as a last line cut short by a kill) are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_metrics(metrics_jsonl_path: str, png_path: str, keys: Sequence[str] | None = None) -> list[str]:
    """Plot each metric against step, one subplot per key, into `png_path`; returns the keys drawn.

    `keys` defaults to `DEFAULT_PLOT_KEYS` then every `eval/...` key, among those the file has
    numeric values for (lists and strings are skipped). Draws with a bare `Figure` on the Agg
    canvas rather than pyplot, so it neither needs a display nor changes the user's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl_path)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and _is_number(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    if keys is None:
        keys = [k for k in DEFAULT_PLOT_KEYS if k in series]
        keys += sorted(k for k in series if k.startswith("eval/"))
    drawn = [k for k in keys if k in series]

    ncols = min(3, max(1, len(drawn)))
    nrows = max(1, math.ceil(len(drawn) / ncols))
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    if not drawn:
        fig.text(0.5, 0.5, "no metrics to plot", ha="center", va="center")
    for i, key in enumerate(drawn):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    # Written beside the target and renamed, so a viewer never opens a half-written image.
    tmp = png_path + ".tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, png_path)
    return drawn


# bf16 dense (no 2:4 sparsity) peak FLOP/s per device, matched in order against the lowercased
# `device_kind` (more specific names first: "tpu v5 lite" before "tpu v5", "h100 pcie" before
# "h100"). Sources: NVIDIA H100 datasheet (SXM 989.4 TF, PCIe 756 TF, NVL 835.5 TF: the sparse
# figures halved), NVIDIA H200 datasheet (SXM = H100 SXM; NVL 835.5 TF), NVIDIA A100 datasheet
# (312 TF), NVIDIA L4 datasheet (121 TF), NVIDIA L40S datasheet (362 TF), Google Cloud TPU system
# architecture docs (v4 275 TF, v5e 197 TF, v5p 459 TF, v6e Trillium 918 TF per chip). JAX names
# the TPUs "TPU v4", "TPU v5 lite" (v5e), "TPU v5" (v5p), "TPU v6 lite" (v6e).
_PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835.5e12),
    ("h200 nvl", 835.5e12),
    ("h100", 989.4e12),
    ("h200", 989.4e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    (r"\bl4\b", 121e12),
    ("tpu v4 lite", None),  # v4i, an inference chip: no published bf16 peak used here.
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # "TPU v5" and "TPU v5p".
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
)


def peak_flops_per_device(device: Any) -> float | None:
    """bf16 dense peak FLOP/s of one `jax.Device`, or None for a CPU or an unknown accelerator."""
    if getattr(device, "platform", None) == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for pattern, flops in _PEAK_BF16_FLOPS:
        if re.search(pattern, kind):
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, devices: Iterable[Any]) -> float | None:
    """Model-FLOPs utilisation: achieved FLOP/s (`flops_per_token * tokens_per_s`, counting the
    model's FLOPs, not rematerialisation) over the summed peak of `devices` (all devices of the
    run, e.g. `jax.devices()`); None when any device's peak is unknown or there are none."""
    peaks = [peak_flops_per_device(d) for d in devices]
    if not peaks or any(p is None for p in peaks):
        return None
    return flops_per_token * tokens_per_s / sum(peaks)
