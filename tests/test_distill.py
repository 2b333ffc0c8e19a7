"""Distillation on tiny models: the teacher's top-k cache against its full logits, the KD objective
against `generalized_jsd` on full logits (and microbatches against one batch), vocabularies that
differ refused for logit KD and accepted for sequence-level KD, on-policy batches that are the
student's own samples, and a KD run SIGKILLed mid-way and rerun — on 8 simulated devices and on
one — equal to one never interrupted."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.data.pipelines import packed_batches, problem_at, rl_prompt_batches
from moe_jax.data.records import read_jsonl, write_jsonl
from moe_jax.data.tasks import make_task
from moe_jax.data.tokenizer import load_tokenizer
from moe_jax.distill import generalized_jsd
from moe_jax.distill.config import KDConfig, KDRunConfig
from moe_jax.distill.objective import kd_loss
from moe_jax.distill.run import on_policy_batch, on_policy_step, train_kd
from moe_jax.distill.teacher import (
    TEACHER_FIELDS,
    Teacher,
    cached_examples,
    check_vocabulary,
    load_teacher,
    write_topk_cache,
)
from moe_jax.errors import InputError
from moe_jax.models import Transformer
from moe_jax.models.sampler import SamplingConfig
from moe_jax.parallel import make_mesh
from moe_jax.pipeline.datasets import task_record
from moe_jax.train.context import init_model_and_optimizer
from moe_jax.train.experiment_config import CorpusConfig, ExperimentConfig, LoopConfig, OptimizerConfig
from moe_jax.train.losses import target_mask
from moe_jax.train.metrics import read_metrics
from moe_jax.train.step import make_train_step
from moe_jax.train.trainer import train
from moe_jax.train.workdir import read_done

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 96
LOOP = LoopConfig(eval_every=4, checkpoint_every=2, eval_problems=8, eval_max_new_tokens=16)
TEACHER = ExperimentConfig(model=dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2),
                           steps=1, batch_size=8, seq_len=SEQ_LEN, task_options="max_digits=1", loop=LOOP)
STUDENT_MODEL = dataclasses.replace(get_preset("tiny-dense-s"), n_layers=1, d_model=32, max_seq_len=SEQ_LEN)
KD = KDConfig(mode="on_policy", top_k=8, on_policy_rate=0.5, sampling=SamplingConfig(max_new_tokens=24))


def _student_run(data: str, **changes) -> KDRunConfig:
    return KDRunConfig(**{"model": STUDENT_MODEL, "steps": 4, "batch_size": 8, "seq_len": SEQ_LEN, "data": data,
                          "task_options": "max_digits=1", "loop": LOOP,
                          "optimizer": OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
                          "corpus": CorpusConfig(error_rate=0.0, loss_on_prompt=False, eval_batches=0), "kd": KD,
                          **changes})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A teacher run (one step of a tiny MoE), 24 traces, and its top-k caches (k = 8 and k = V)."""
    root = tmp_path_factory.mktemp("distill")
    teacher_dir = str(root / "teacher")
    train(TEACHER, teacher_dir)
    task = make_task("arithmetic", max_digits=1)
    records = []
    for i in range(24):
        problem = problem_at(task, 11, i)
        records.append(task_record(problem, task.prompt(problem, "compact"),
                                   task.completion(problem, np.random.default_rng(i), 0.0), "test"))
    traces = str(root / "traces.jsonl")
    write_jsonl(traces, records)
    mesh = make_mesh("auto")
    teacher = load_teacher(teacher_dir, mesh)
    write_topk_cache(teacher, traces, str(root / "topk"), k=8, seq_len=SEQ_LEN, mesh=mesh, rows=16)
    write_topk_cache(teacher, traces, str(root / "full"), k=0, seq_len=SEQ_LEN, mesh=mesh, rows=16)
    return {"root": root, "teacher_dir": teacher_dir, "teacher": teacher, "traces": traces, "mesh": mesh}


@jax.jit
def _full_logits(model: Transformer, batch: dict) -> jax.Array:
    logits, _ = model(batch["tokens"], segment_ids_BxT=batch["segment_ids"], positions_BxT=batch["positions"],
                      mtp=False)
    return logits


def test_a_full_width_cache_holds_each_records_teacher_log_softmax(world):
    """k = V: the cache of record i is the log-softmax of the teacher's logits over that record run
    alone — the ids sorted by probability, every id once."""
    teacher, tokenizer = world["teacher"], world["teacher"].tokenizer
    examples = cached_examples(world["traces"], str(world["root"] / "full"), tokenizer, seq_len=SEQ_LEN)
    vocab = teacher.model.cfg.vocab_size
    for index in (0, 7, 23):
        example = examples[index]
        tokens = example["tokens"][None]
        batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": np.arange(tokens.shape[1])[None]}
        expected_LxV = np.asarray(jax.nn.log_softmax(_full_logits(teacher.model, batch)[0], axis=-1))
        ids_LxV, logp_LxV = example["teacher_ids"], example["teacher_logp"]
        assert ids_LxV.shape == (tokens.shape[1], vocab)
        assert (np.sort(ids_LxV, axis=1) == np.arange(vocab)).all()
        np.testing.assert_allclose(logp_LxV, np.take_along_axis(expected_LxV, ids_LxV, axis=1), atol=1e-5)
        assert (np.diff(logp_LxV, axis=1) <= 0).all()


def test_a_cache_that_does_not_fit_the_run_is_refused(world, tmp_path):
    tokenizer = world["teacher"].tokenizer
    with pytest.raises(InputError, match="holds k=8, the run asks for k=4"):
        cached_examples(world["traces"], str(world["root"] / "topk"), tokenizer, seq_len=SEQ_LEN, k=4)
    fewer = str(tmp_path / "fewer.jsonl")
    write_jsonl(fewer, read_jsonl(world["traces"])[:5])
    with pytest.raises(InputError, match="holds 24 records, the traces .* 5"):
        cached_examples(fewer, str(world["root"] / "topk"), tokenizer, seq_len=SEQ_LEN)


def test_the_kd_objective_on_a_full_cache_is_generalized_jsd_of_the_full_logits(world):
    """Packed rows of the full-width cache: the objective's divergence equals `generalized_jsd` of
    the student's and the teacher's full logits on the same rows (the top-k rode through packing in
    place), and α mixes in the data's cross-entropy."""
    teacher = world["teacher"]
    examples = cached_examples(world["traces"], str(world["root"] / "full"), teacher.tokenizer, seq_len=SEQ_LEN)
    batch = next(iter(packed_batches(examples, seq_len=SEQ_LEN, batch_size=4, seed=0, weighted=True,
                                     fields=TEACHER_FIELDS)))
    student = Transformer(STUDENT_MODEL, rngs=nnx.Rngs(1))
    valid = target_mask(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["loss_mask"]), 1)
    expected = generalized_jsd(_full_logits(student, batch)[:, :-1], _full_logits(teacher.model, batch)[:, :-1],
                               valid, beta=0.3, temperature=1.5)
    jnp_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    kd = KDConfig(mode="logit", beta=0.3, temperature=1.5, alpha=0.25)
    loss, metrics = jax.jit(kd_loss(kd))(student, jnp_batch)
    np.testing.assert_allclose(float(metrics["jsd"]), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.75 * float(metrics["jsd"]) + 0.25 * float(metrics["ce"]), rtol=1e-6)


def test_two_microbatches_make_the_step_of_one_batch(world):
    """The divergence is a sum over the step's targets over their count, so accumulating two
    microbatches gives the same update as one batch."""
    examples = cached_examples(world["traces"], str(world["root"] / "topk"), world["teacher"].tokenizer,
                               seq_len=SEQ_LEN)
    batch = next(iter(packed_batches(examples, seq_len=SEQ_LEN, batch_size=8, seed=0, weighted=True,
                                     fields=TEACHER_FIELDS)))
    run = _student_run(world["traces"], kd=dataclasses.replace(KD, mode="logit"))
    params = []
    for microbatches in (1, 2):
        model, optimizer = init_model_and_optimizer(run, world["mesh"])
        step, state = make_train_step(model, optimizer, loss_fn=kd_loss(run.kd), microbatches=microbatches)
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        params.append((jax.tree.map(np.asarray, state[0]), float(metrics["jsd"])))
    np.testing.assert_allclose(params[0][1], params[1][1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params[0][0], params[1][0])


def _word_level_tokenizer(path: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"0123456789+-=", "<think>", "</think>",
                                          "<answer>", "</answer>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(path)
    return path


def test_different_vocabularies_are_refused_for_logit_kd_and_accepted_for_sequence_kd(world, tmp_path):
    char = world["teacher"].tokenizer
    other = load_tokenizer(_word_level_tokenizer(str(tmp_path / "tokenizer.json")))
    for mode in ("logit", "on_policy"):
        with pytest.raises(InputError, match=f"kd.mode={mode}: the teacher's vocabulary .* Fix: "):
            check_vocabulary(char, other, mode)
    check_vocabulary(char, other, "sequence")
    check_vocabulary(char, load_tokenizer("char"), "logit")
    # Through a run: refused when the run is built, before a step compiles or a file is written.
    teacher = Teacher(world["teacher"].model, other, "elsewhere")
    workdir = str(tmp_path / "refused")
    with pytest.raises(InputError, match="vocabulary"):
        train_kd(_student_run(world["traces"], kd=dataclasses.replace(KD, mode="logit")), workdir, teacher=teacher)
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    # Sequence-level KD reads text: a student with its own tokenizer trains on the same traces.
    own = _student_run(world["traces"], tokenizer=str(tmp_path / "tokenizer.json"), steps=1,
                       kd=dataclasses.replace(KD, mode="sequence"))
    assert train_kd(own, str(tmp_path / "sequence"))["status"] == "finished"


def test_a_hugging_face_folder_teaches_with_its_own_tokenizer(world, tmp_path):
    """`hf:<folder>`: the architecture from its config.json, the weights from its safetensors and the
    tokenizer from its tokenizer.json; it computes what the run it was exported from computes."""
    from moe_jax.interop import save_hf

    model = world["teacher"].model
    folder = tmp_path / "hf"
    save_hf(model, model.cfg, str(folder))
    _word_level_tokenizer(str(folder / "tokenizer.json"))
    teacher = load_teacher(f"hf:{folder}", world["mesh"])
    assert teacher.tokenizer.vocab_size == 21 and teacher.model.cfg.n_routed_experts == model.cfg.n_routed_experts
    tokens = np.asarray([[1, 5, 6, 7, 8, 2]], np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": np.arange(6)[None]}
    np.testing.assert_allclose(np.asarray(_full_logits(teacher.model, batch)), np.asarray(_full_logits(model, batch)),
                               atol=1e-5)
    with pytest.raises(InputError, match="vocabulary"):
        check_vocabulary(teacher.tokenizer, world["teacher"].tokenizer, "logit")


def test_on_policy_batches_are_the_students_own_samples(world):
    """The rows hold the prompt and the student's completion, the loss on the completion only, and
    each completion token's sampler log-prob is the student's log-prob of it on those rows."""
    tokenizer, mesh = world["teacher"].tokenizer, world["mesh"]
    student = Transformer(STUDENT_MODEL, rngs=nnx.Rngs(3))
    task = make_task("arithmetic", max_digits=1)
    prompt_len = SEQ_LEN - KD.sampling.max_new_tokens
    prompts = next(iter(rl_prompt_batches(task, tokenizer, seed=0, batch_size=8, prompt_len=prompt_len,
                                          template="compact")))
    batch = on_policy_batch(student, prompts, sampling=KD.sampling, tokenizer=tokenizer, key=jax.random.key(5),
                            seq_len=SEQ_LEN, mesh=mesh)
    assert batch["tokens"].shape == (8, SEQ_LEN)
    np.testing.assert_array_equal(batch["tokens"][:, :prompt_len], prompts["prompt_tokens"])
    completion_mask = batch["loss_mask"][:, prompt_len:prompt_len + KD.sampling.max_new_tokens]
    assert batch["loss_mask"][:, :prompt_len].sum() == 0 and completion_mask.sum() > 8
    logp_BxSxV = jax.nn.log_softmax(_full_logits(student, batch) / KD.sampling.temperature, axis=-1)
    n = KD.sampling.max_new_tokens
    completion_BxN = batch["tokens"][:, prompt_len:prompt_len + n]
    scored_BxN = np.take_along_axis(np.asarray(logp_BxSxV[:, prompt_len - 1:prompt_len + n - 1]),
                                    completion_BxN[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.where(completion_mask, scored_BxN, 0.0),
                               np.where(completion_mask, batch["sample_logp"], 0.0), atol=2e-5)
    other = Transformer(STUDENT_MODEL, rngs=nnx.Rngs(4))  # another model would not have sampled them
    other_logp = jax.nn.log_softmax(_full_logits(other, batch), axis=-1)[:, prompt_len - 1:prompt_len + n - 1]
    assert not np.allclose(np.where(completion_mask, np.take_along_axis(
        np.asarray(other_logp), completion_BxN[..., None], axis=-1)[..., 0], 0.0),
        np.where(completion_mask, batch["sample_logp"], 0.0), atol=1e-2)


def test_the_on_policy_coin_is_fixed_by_seed_and_step_and_has_rate_lambda():
    draws = [on_policy_step(0, step, 0.3) for step in range(1, 2001)]
    assert draws == [on_policy_step(0, step, 0.3) for step in range(1, 2001)]
    assert abs(np.mean(draws) - 0.3) < 0.04
    assert not any(on_policy_step(0, s, 0.0) for s in range(100)) and all(on_policy_step(0, s, 1.0) for s in range(100))


# Runs one KD run (config JSON, workdir, teacher, cache); with a fifth argument, SIGKILLs itself
# when that step has been dispatched.
SCRIPT = """
import json, os, signal, sys
from moe_jax.distill.config import KDRunConfig
from moe_jax.distill.run import train_kd
from moe_jax.distill.teacher import load_teacher
from moe_jax.parallel import make_mesh

cfg = KDRunConfig.from_dict(json.load(open(sys.argv[1])))
kill_at = int(sys.argv[5]) if len(sys.argv) > 5 else None

def kill(step, state):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

teacher = load_teacher(sys.argv[3], make_mesh("auto"))
train_kd(cfg, sys.argv[2], teacher=teacher, cache=sys.argv[4], hooks=[kill])
"""


def _losses(workdir: str) -> dict[int, tuple[float, float, float]]:
    return {m["step"]: (m["loss"], m["jsd"], m["on_policy"]) for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))}


def test_a_kd_run_killed_midway_resumes_to_the_uninterrupted_numbers_on_8_devices_and_on_one(world, tmp_path):
    """On-policy KD (λ = 0.5: steps of both kinds) with the top-k cache: SIGKILL after step 3's
    dispatch (the newest checkpoint is step 2), rerun, and every step's loss equals the run never
    interrupted; the same run on one device gives the same numbers to fp32 rounding."""
    assert {on_policy_step(0, s, KD.on_policy_rate) for s in range(1, 5)} == {True, False}
    cfg = _student_run(world["traces"])
    config = tmp_path / "kd.json"
    config.write_text(cfg.to_json())
    cache = str(world["root"] / "topk")
    uninterrupted = str(tmp_path / "uninterrupted")
    train_kd(cfg, uninterrupted, teacher=world["teacher"], cache=cache)

    def run(workdir, *extra, devices=8):
        env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(
            "device_count=8", f"device_count={devices}")}
        return subprocess.run([sys.executable, "-c", SCRIPT, str(config), workdir, world["teacher_dir"], cache,
                               *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)

    killed = str(tmp_path / "killed")
    out = run(killed, "3")
    assert out.returncode == -9, out.stderr[-2000:]
    assert max(_losses(killed)) < cfg.steps
    out = run(killed)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _losses(killed) == _losses(uninterrupted)
    one_device = str(tmp_path / "one_device")
    out = run(one_device, devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    expected, got = _losses(uninterrupted), _losses(one_device)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=2e-5)
    assert read_done(one_device)["step"] == cfg.steps
