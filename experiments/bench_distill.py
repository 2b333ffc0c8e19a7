"""Time the student's distillation steps against plain SFT of the same student, and size the
teacher's top-k cache.

Four runs' steps, each built by the library exactly as a run builds it (its data pipeline, its
jitted step; the host work of a step is timed with it), on the same student config:

- `sft`: plain SFT on the task stream (`moe_jax.train.trainer.lm_run`, no dataset);
- `seq_kd`: sequence-level KD, i.e. SFT on the teacher's traces on disk (the same step, records);
- `logit_kd_cached`: logit KD (generalized JSD) on the traces with the teacher's cached top-k;
- `logit_kd_teacher`: the same with the teacher's top-k computed by its forward each step.

They run interleaved, `--steps` steps each per round, `--repeats` rounds (a drift of the machine
hits every side alike); steps/s is the median over rounds. The teacher (the pipeline's model,
random init unless `--teacher` names a run) writes the cache first; its bytes per token are
reported against full-vocabulary fp32 logits. Prints one JSON line.

    python experiments/bench_distill.py                      # tiny-dense-s student, CPU
    python experiments/bench_distill.py --config=tiny-dense --kd_top_k=32
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from moe_jax import config_flags
from moe_jax.data.pipelines import problem_at
from moe_jax.data.records import write_jsonl
from moe_jax.data.tokenizer import load_tokenizer
from moe_jax.distill.config import DistillConfig
from moe_jax.distill.distillation import run_task
from moe_jax.distill.run import kd_run
from moe_jax.distill.teacher import Teacher, load_teacher, write_topk_cache
from moe_jax.models import Transformer
from moe_jax.parallel import init_sharded, make_mesh
from moe_jax.pipeline.datasets import task_record
from moe_jax.train import driver
from moe_jax.train.context import make_context
from moe_jax.train.trainer import lm_run

config_flags.define_config_flags(default="tiny-dense-s", config_class=DistillConfig)
flags.DEFINE_string("teacher", None, "a trained teacher run (its workdir); default: the pipeline's model, random init")
flags.DEFINE_integer("traces", 512, "trace records written for the benchmark")
flags.DEFINE_integer("kd_top_k", 16, "k of the top-k cache")
flags.DEFINE_integer("steps", 10, "timed steps per side per round")
flags.DEFINE_integer("repeats", 3, "interleaved rounds (the median is reported)")
FLAGS = flags.FLAGS


def _traces(cfg: DistillConfig, path: str, count: int) -> None:
    """`count` worked solutions of the student's tasks, in the SFT record format."""
    task = run_task(cfg.stage_run("student"))
    records = []
    for i in range(count):
        problem = problem_at(task, 123, i)
        completion = task.completion(problem, np.random.default_rng(i), 0.0)
        records.append(task_record(problem, task.prompt(problem, cfg.pipeline.template), completion, "bench"))
    write_jsonl(path, records)


def main(argv: list[str]) -> None:
    del argv
    cfg = config_flags.config_from_flags(config_class=DistillConfig, model_defaults={"max_seq_len": 256})
    mesh = make_mesh("auto")
    if FLAGS.teacher:
        teacher = load_teacher(FLAGS.teacher, mesh)
    else:
        teacher_cfg = cfg.pipeline.model
        teacher = Teacher(init_sharded(lambda: Transformer(teacher_cfg, rngs=nnx.Rngs(0)), mesh),
                          load_tokenizer(cfg.pipeline.tokenizer), "random init")
    student = cfg.stage_run("student")
    with tempfile.TemporaryDirectory() as tmp:
        traces = f"{tmp}/traces.jsonl"
        _traces(cfg, traces, FLAGS.traces)
        start = time.perf_counter()
        cache = write_topk_cache(teacher, traces, f"{tmp}/topk", k=FLAGS.kd_top_k, seq_len=student.seq_len,
                                 mesh=mesh)
        cache_s = time.perf_counter() - start
        logit = dataclasses.replace(student, data=traces, kd=dataclasses.replace(cfg.kd, mode="logit",
                                                                                     top_k=FLAGS.kd_top_k))
        builds = {"sft": (student, lm_run()), "seq_kd": (dataclasses.replace(student, data=traces), lm_run()),
                  "logit_kd_cached": (logit, kd_run(logit, teacher, f"{tmp}/topk")),
                  "logit_kd_teacher": (logit, kd_run(logit, teacher, None))}
        sides: dict[str, list] = {}
        for name, (run, build) in builds.items():
            parts: driver.RunParts = build(make_context(run))
            sides[name] = [parts, parts.state, 0]

        def advance(name: str, steps: int) -> float:
            """`steps` steps of one side (data, dispatch, update), waited for; their seconds."""
            parts, state, done = sides[name]
            start = time.perf_counter()
            for n in range(done + 1, done + steps + 1):
                state, _ = parts.step(n, state)
            jax.block_until_ready(state)
            sides[name][1:] = [state, done + steps]
            return time.perf_counter() - start

        for name in sides:  # compile, and fill the pipelines
            advance(name, 2)
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(FLAGS.repeats):
            for name in sides:
                seconds[name].append(advance(name, FLAGS.steps))
    steps_per_s = {name: FLAGS.steps / statistics.median(s) for name, s in seconds.items()}
    device = jax.devices()[0]
    print(json.dumps({
        "platform": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
        "student": cfg.model.name, "teacher": teacher.model.cfg.name, "teacher_source": teacher.source,
        "batch_size": student.batch_size, "seq_len": student.seq_len, "steps": FLAGS.steps,
        "repeats": FLAGS.repeats, "steps_per_s": {k: round(v, 3) for k, v in steps_per_s.items()},
        "seq_kd_vs_sft": round(steps_per_s["seq_kd"] / steps_per_s["sft"], 3),
        "logit_kd_cached_vs_sft": round(steps_per_s["logit_kd_cached"] / steps_per_s["sft"], 3),
        "logit_kd_teacher_vs_sft": round(steps_per_s["logit_kd_teacher"] / steps_per_s["sft"], 3),
        "cache": {"k": cache["k"], "records": cache["records"], "tokens": cache["tokens"], "seconds": round(cache_s, 2),
                  "bytes_per_token": cache["bytes_per_token"],
                  "full_logits_bytes_per_token": cache["full_logits_bytes_per_token"],
                  "vs_full_logits": round(cache["bytes_per_token"] / cache["full_logits_bytes_per_token"], 4)}}))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
