"""SFT on dataset files: JSON Lines and ArrayRecord records become packed rows with the loss on the
response only; a run resumes mid-file at the same record; a bad file fails naming the file, the
line and the fix; a record's weight scales its loss."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from moe_jax.configs import get_preset
from moe_jax.data.pipelines import packed_batches, record_examples
from moe_jax.data.records import DatasetError, load_records, read_jsonl, write_array_record, write_jsonl
from moe_jax.data.tasks import make_task
from moe_jax.data.tokenizer import CharTokenizer
from moe_jax.train.config_tree import override
from moe_jax.train.experiment_config import CorpusConfig, ExperimentConfig, LoopConfig, OptimizerConfig
from moe_jax.train.metrics import read_metrics
from moe_jax.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = CharTokenizer()
CFG = ExperimentConfig(
    model=dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2),
    steps=6, batch_size=8, seq_len=96, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
    loop=LoopConfig(eval_every=100, checkpoint_every=2, eval_problems=2, eval_max_new_tokens=4),
    corpus=CorpusConfig(eval_batches=0, loss_on_prompt=False))


def _records(count=96):
    task, rng = make_task("arithmetic", max_digits=2), np.random.default_rng(0)
    problems = [task.generate(rng) for _ in range(count)]
    return [{"prompt": task.prompt(p, "compact"), "response": task.completion(p, rng), "task": "arithmetic",
             "source": "test"} for p in problems]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    records = _records()
    write_jsonl(str(folder / "sft.jsonl"), records)
    write_array_record(str(folder / "sft.array_record"), records)
    return str(folder / "sft.jsonl"), str(folder / "sft.array_record"), records


def _losses(workdir):
    return [m["loss"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def test_rows_put_the_loss_on_the_response_only(files):
    jsonl, array_record, records = files
    assert read_jsonl(jsonl) == records and len(load_records(array_record)) == len(records)
    batch = next(iter(packed_batches(record_examples(jsonl, TOKENIZER, seq_len=96), seq_len=96,
                                     batch_size=4, seed=0, shuffle=False, weighted=True)))
    row, mask = batch["tokens"][0], batch["loss_mask"][0]
    first = records[0]  # unshuffled: the first row starts with record 0
    prompt_len = len(TOKENIZER.encode(first["prompt"], add_bos=True))
    response_ids = TOKENIZER.encode(first["response"], add_eos=True)
    np.testing.assert_array_equal(row[prompt_len:prompt_len + len(response_ids)], response_ids)
    assert not mask[:prompt_len].any() and mask[prompt_len:prompt_len + len(response_ids)].all()
    assert (batch["loss_weight"] == (batch["segment_ids"] != 0)).all()  # weight 1 on every real token


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    """sft.py on the JSON Lines file, through the real command line."""
    workdir = str(tmp_path_factory.mktemp("sft_jsonl"))
    config = tmp_path_factory.mktemp("cfg") / "config.json"
    config.write_text(CFG.to_json())
    out = subprocess.run([sys.executable, "experiments/sft.py", f"--workdir={workdir}", f"--config={config}",
                          f"--config.data={files[0]}", "--init_from=scratch"], cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("kind", [0, 1], ids=["jsonl", "array_record"])
def test_sft_resumes_mid_file_at_the_same_record(files, uninterrupted, kind, tmp_path):
    """Preempted at step 3 (checkpoint), resumed: the per-step losses equal the uninterrupted
    JSON Lines run's — also when the same records are read from the ArrayRecord file."""
    def sigterm_at_step_3(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = override(CFG, {"data": files[kind], "loop.checkpoint_every": 3})
    workdir = str(tmp_path / "resumed")
    assert train(cfg, workdir, hooks=[sigterm_at_step_3])["status"] == "preempted"
    assert train(cfg, workdir)["status"] == "finished"
    assert len(_losses(workdir)) == CFG.steps
    np.testing.assert_allclose(_losses(workdir), _losses(uninterrupted), rtol=1e-6)


def test_a_record_weight_scales_its_loss(files):
    from moe_jax.train.losses import next_token_loss

    rng = np.random.default_rng(0)
    logits, tokens = rng.normal(size=(1, 6, 8)).astype(np.float32), rng.integers(0, 8, (1, 6))
    segments, mask = np.array([[1, 1, 1, 2, 2, 2]]), np.ones((1, 6), np.int32)
    weight = np.array([[2.0, 2.0, 2.0, 0.0, 0.0, 0.0]], np.float32)
    unweighted = float(next_token_loss(logits, tokens, segments, mask))
    # document 2 weighs nothing; document 1's two targets count twice, over the same 4 targets
    doc1 = next_token_loss(logits, tokens, np.array([[1, 1, 1, 0, 0, 0]]), mask, normalizer=4)
    np.testing.assert_allclose(next_token_loss(logits, tokens, segments, mask, weight_BxT=weight), 2 * doc1,
                               rtol=1e-6)
    assert not np.isclose(unweighted, 2 * doc1)


@pytest.mark.parametrize("content, where, problem", [
    (b'{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="}\n', ":2", "missing field 'response'"),
    (b'{"prompt": "1+1=", "response": "\xff"}\n', ":1", "not UTF-8"),
    (b"\n\n", "bad.jsonl", "no records"),
    (b"not json\n", ":1", "not JSON"),
    (b'{"prompt": 3, "response": "2"}\n', ":1", "field 'prompt' must be a string"),
    (b'{"prompt": "1", "response": "2", "weight": -1}\n', ":1", "field 'weight' must be a finite number"),
    (b'{"prompt": "1", "response": "2", "answer": "2"}\n', ":1", "unknown field"),
])
def test_a_bad_dataset_file_names_the_file_the_line_and_the_fix(tmp_path, content, where, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="Fix: ") as error:
        record_examples(str(path), TOKENIZER, seq_len=48)
    assert f"{path}{where}" in str(error.value) if where.startswith(":") else where in str(error.value)
    assert problem in str(error.value)


def test_a_record_longer_than_seq_len_is_refused_not_cut(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n"
                    + json.dumps({"prompt": "9" * 60, "response": "9"}) + "\n")
    with pytest.raises(DatasetError, match=rf"{path}:2: 63 tokens > seq_len=48 .* raise --config.seq_len to at least 63"):
        record_examples(str(path), TOKENIZER, seq_len=48)


def test_missing_or_mixed_files_fail_before_the_workdir_is_written(tmp_path, files):
    workdir = tmp_path / "run"
    with pytest.raises(DatasetError, match="no such file"):
        train(dataclasses.replace(CFG, data=str(tmp_path / "nope*.jsonl")), str(workdir))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"only \.jsonl files or only \.array_record"):
        train(dataclasses.replace(CFG, data=str(tmp_path / "a.*")), str(workdir))
    assert not (workdir / "config.json").exists()
