"""Time the R1 pipeline's rejection-sampling stage against plain decoding at the same batch.

The stage (`moe_jax.pipeline.rejection.rejection_sample`: k completions per prompt drawn by the
refilling sampler — `prompts_per_batch × k` rows that take the next prompt as they finish — then
decode, verify, filter and `write_dataset`) on `--prompts` fresh prompts, and — interleaved with
it, repeat by repeat — `jit_generate` alone on one batch of as many rows, timed as
`bench_generate.py` times it (decode tokens/s = rows × new tokens / (generate − prefill) seconds,
every row decoding the whole budget: the ceiling). The stage's tokens/s counts the tokens it
actually sampled. The model is the config's, randomly initialised (`--init_from` loads a trained
one, whose completions end early and vary in length). Prints one JSON line.

    python experiments/bench_rejection.py                         # tiny-moe, CPU
    python experiments/bench_rejection.py --init_from=/tmp/r1/reasoning_rl
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from moe_jax import config_flags
from moe_jax.data.pipelines import left_padded_prompts, prompt_ids
from moe_jax.data.tokenizer import CharTokenizer
from moe_jax.models import init_cache
from moe_jax.models.sampler import SamplingConfig, jit_generate
from moe_jax.parallel import make_mesh
from moe_jax.pipeline import datasets
from moe_jax.pipeline.config import PipelineConfig, RejectionConfig
from moe_jax.pipeline.rejection import rejection_sample
from moe_jax.train.context import init_model_and_optimizer, load_init_from
from moe_jax.train.experiment_config import run_task

config_flags.define_config_flags(config_class=PipelineConfig)
flags.DEFINE_string("init_from", None, "a trained model to sample from (a workdir); default: random init")
flags.DEFINE_integer("prompts", 512, "prompts per timed stage run (the stage's default)")
flags.DEFINE_integer("prompts_per_batch", 64, "prompts sampled together")
flags.DEFINE_integer("samples_per_prompt", 4, "k")
flags.DEFINE_integer("new_tokens", 160, "sampling budget per completion")
flags.DEFINE_integer("repeats", 3, "timed runs of each side, interleaved (the median is reported)")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    cfg = config_flags.config_from_flags(config_class=PipelineConfig, model_defaults={"max_seq_len": 256})
    run = cfg.stage_run("reasoning_rl")
    mesh = make_mesh("auto")
    model, _ = init_model_and_optimizer(run, mesh)
    if FLAGS.init_from:
        load_init_from(model, FLAGS.init_from)
    tokenizer, task = CharTokenizer(), run_task(run)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=FLAGS.new_tokens, samples_per_prompt=FLAGS.samples_per_prompt)
    rs = RejectionConfig(prompts=FLAGS.prompts, prompts_per_batch=FLAGS.prompts_per_batch, sampling=sampling,
                         max_tokens=FLAGS.new_tokens)
    problems = datasets.fresh_problems(task, 17, FLAGS.prompts, set())

    def stage(repeat: int) -> dict[str, float]:
        start = time.perf_counter()
        result = rejection_sample(model, task, problems, tokenizer=tokenizer, template=cfg.template, cfg=rs,
                                  key=jax.random.key(repeat), mesh=mesh)
        written = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            datasets.write_dataset(out, result.records, result.stats, rs.array_record_above, result.rejected)
        end = time.perf_counter()
        return {"seconds": end - start, "sampling": result.seconds["sampling"],
                "host": result.seconds["filtering"] + end - written, "tokens": result.tokens}

    # Plain decoding of one batch of the stage's shape: its rows' prompts, k copies each.
    rows = FLAGS.prompts_per_batch * FLAGS.samples_per_prompt
    batch = [prompt_ids(task, tokenizer, p, cfg.template) for p in problems[:FLAGS.prompts_per_batch]]
    tokens_PxL, segments_PxL = left_padded_prompts(batch, tokenizer.pad_id)
    prompt_BxL, segments_BxL = (jnp.repeat(jnp.asarray(a), FLAGS.samples_per_prompt, axis=0)
                                for a in (tokens_PxL, segments_PxL))
    prefill = jax.jit(lambda m, t, s: m(t, segment_ids_BxT=s, cache=init_cache(
        m.cfg, rows, t.shape[1] + FLAGS.new_tokens))[0])

    def decode(repeat: int) -> dict[str, float]:
        start = time.perf_counter()
        jax.block_until_ready(jit_generate(model, prompt_BxL, segments_BxL, eos_id=-1, pad_id=tokenizer.pad_id,
                                           rng=jax.random.key(repeat), **sampling.generate_kwargs()))
        middle = time.perf_counter()
        jax.block_until_ready(prefill(model, prompt_BxL, segments_BxL))
        return {"generate": middle - start, "prefill": time.perf_counter() - middle}

    stage(-1), decode(-1)  # compile both
    stages, decodes = [], []
    for repeat in range(FLAGS.repeats):  # interleaved: a drift of the machine hits both sides alike
        stages.append(stage(repeat))
        decodes.append(decode(repeat))
    median = {key: statistics.median(s[key] for s in stages) for key in stages[0]}
    generate_s = statistics.median(d["generate"] for d in decodes)
    decode_s = max(generate_s - statistics.median(d["prefill"] for d in decodes), 1e-9)
    samples = FLAGS.prompts * FLAGS.samples_per_prompt
    decode_tokens_per_s = rows * FLAGS.new_tokens / decode_s
    stage_tokens_per_s = median["tokens"] / median["seconds"]
    device = jax.devices()[0]
    print(json.dumps({
        "platform": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
        "config": run.model.name, "prompts": FLAGS.prompts, "samples_per_prompt": FLAGS.samples_per_prompt,
        "batch_rows": rows, "new_tokens": FLAGS.new_tokens, "repeats": FLAGS.repeats,
        "stage_seconds": round(median["seconds"], 3), "samples_per_s": round(samples / median["seconds"], 1),
        "stage_tokens_per_s": round(stage_tokens_per_s, 1),
        "decode_tokens_per_s": round(decode_tokens_per_s, 1),
        "generate_tokens_per_s": round(rows * FLAGS.new_tokens / generate_s, 1),
        "stage_vs_decode": round(stage_tokens_per_s / decode_tokens_per_s, 3),
        "host_share": round(median["host"] / median["seconds"], 4),
        "sampled_tokens_share": round(median["tokens"] / (samples * FLAGS.new_tokens), 3)}))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)
