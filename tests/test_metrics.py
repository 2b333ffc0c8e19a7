"""Metrics on disk (JSON lines, TensorBoard events, PNG plot), MFU, and the progress line."""

from __future__ import annotations

import glob
import io
import os
import struct
import types

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from moe_jax.train.metrics import MetricsWriter, mfu, peak_flops_per_device, plot_metrics, read_metrics
from moe_jax.train.progress import Progress, format_number


def read_tfrecords(path: str) -> list[bytes]:
    """Payloads of a TFRecord file: 8-byte little-endian length, 4-byte crc, payload, 4-byte crc."""
    payloads = []
    with open(path, "rb") as f:
        while header := f.read(8):
            (length,) = struct.unpack("<Q", header)
            f.read(4)
            payloads.append(f.read(length))
            f.read(4)
    return payloads


def tb_scalars(workdir: str) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the run's event files, in file-then-record order."""
    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        for payload in read_tfrecords(path):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.append((value.tag, event.step, value.simple_value))
    return out


def test_jsonl_round_trip_converts_numpy_and_lists(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write(1, {"loss": np.float32(2.5), "tokens": np.int64(128), "load": np.array([0.25, 0.75]),
                         "stage": "sft"})
        writer.write(2, {"loss": 2.0})
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert records == [{"step": 1, "loss": 2.5, "tokens": 128, "load": [0.25, 0.75], "stage": "sft"},
                       {"step": 2, "loss": 2.0}]
    assert type(records[0]["tokens"]) is int
    with pytest.raises(TypeError, match="'bad'"):
        MetricsWriter(str(tmp_path / "other")).write(1, {"bad": np.array(["x"])})


def test_fresh_run_truncates_and_resume_drops_rerun_steps(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with MetricsWriter(str(tmp_path)) as writer:
        for step in range(1, 11):
            writer.write(step, {"loss": float(step)})
    with open(path, "a") as f:
        f.write('{"step": 11, "lo')  # A line cut short by the kill.
    with MetricsWriter(str(tmp_path), resume_step=6) as writer:
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 6]
        for step in range(7, 13):
            writer.write(step, {"loss": 100.0 + step})
    records = read_metrics(path)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["loss"] for r in records] == [1, 2, 3, 4, 5, 6] + [100.0 + s for s in range(7, 13)]
    assert not os.path.exists(path + ".tmp")

    with MetricsWriter(str(tmp_path)) as writer:  # resume_step=0: a fresh run.
        writer.write(1, {"loss": 9.0})
    assert read_metrics(path) == [{"step": 1, "loss": 9.0}]


def test_tensorboard_events_are_readable(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write(3, {"loss": 1.5, "router/load": [0.5, 2.0], "stage": "sft"})
    scalars = tb_scalars(str(tmp_path))
    assert scalars == [("loss", 3, 1.5), ("router/load/layer_0", 3, 0.5), ("router/load/layer_1", 3, 2.0)]


def test_tensorboard_resume_marks_purge_step(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write(5, {"loss": 1.0})
    with MetricsWriter(str(tmp_path), resume_step=4) as writer:
        writer.write(5, {"loss": 2.0})
    events = [event_pb2.Event.FromString(p)
              for path in glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
              for p in read_tfrecords(path)]
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts == [5]  # TensorBoard hides the killed run's events from step 5 on.


def test_plot_writes_png(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": 3.0 / step, "lr": 1e-3, "layer_loads": [1.0, 2.0], "stage": "x"})
        writer.write(5, {"eval/loss": 0.9})
    png = str(tmp_path / "metrics.png")
    drawn = plot_metrics(str(tmp_path / "metrics.jsonl"), png)
    assert drawn == ["loss", "lr", "eval/loss"]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def device(kind: str, platform: str = "gpu") -> types.SimpleNamespace:
    return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_peak_flops_and_mfu():
    assert peak_flops_per_device(device("NVIDIA H100 80GB HBM3")) == 989.4e12
    assert peak_flops_per_device(device("NVIDIA H100 PCIe")) == 756e12
    assert peak_flops_per_device(device("NVIDIA A100-SXM4-80GB")) == 312e12
    assert peak_flops_per_device(device("NVIDIA L4")) == 121e12
    assert peak_flops_per_device(device("NVIDIA L40S")) == 362e12
    assert peak_flops_per_device(device("TPU v5 lite", "tpu")) == 197e12
    assert peak_flops_per_device(device("TPU v5", "tpu")) == 459e12
    assert peak_flops_per_device(device("TPU v6 lite", "tpu")) == 918e12
    assert peak_flops_per_device(device("cpu", "cpu")) is None
    assert peak_flops_per_device(device("Mystery Accelerator 9000")) is None
    # 4 v4 chips at 275 TF each = 1.1e15 FLOP/s peak; 6e9 FLOPs/token * 55,000 tokens/s = 3.3e14.
    v4s = [device("TPU v4", "tpu")] * 4
    assert mfu(6e9, 55_000, v4s) == pytest.approx(0.3)
    assert mfu(6e9, 55_000, v4s + [device("cpu", "cpu")]) is None
    assert mfu(6e9, 55_000, []) is None


def test_progress_on_a_file_prints_throttled_lines_with_eta():
    stream = io.StringIO()
    progress = Progress(300, start_step=100, stream=stream, every_s=1e9)
    for step in range(101, 121):
        progress.update(step, {"loss": np.float32(1.234), "tokens_per_s": 5400.0, "skipped": [1.0, 2.0]})
    progress.close()  # the throttled last update is printed on close, once
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 2 and "100/300" in lines[0]
    assert lines[1].startswith(" 40%|####") and "120/300 [" in lines[1]
    assert "step/s, loss 1.234 | tokens/s 5.40k]" in lines[1]

    stream = io.StringIO()
    progress = Progress(3, stream=stream, every_s=0.0)
    for step in (1, 2, 3):
        progress.update(step, {"loss": 0.5})
    progress.close()
    assert [line.split("|")[0] for line in stream.getvalue().splitlines()] == ["  0%", " 33%", " 67%", "100%"]


def test_progress_on_a_tty_rewrites_the_line():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = Progress(3, stream=stream)
    for step in (1, 2, 3):
        progress.update(step, {"loss": 0.5})
    progress.close()
    out = stream.getvalue()
    assert out.startswith("\r") and out.endswith("\n") and out.count("\n") == 1
    assert "3/3 [" in out and "loss 0.5]" in out
    assert [format_number(x) for x in (0.004123, 1.2345, 5400.0)] == ["0.004123", "1.234", "5.40k"]
