import numpy as np
import pytest

from moe_jax.data.pipelines import packed_batches, problem_at, rl_prompt_batches, task_examples
from moe_jax.data.tasks import make_task
from moe_jax.data.tokenizer import CharTokenizer

TASK = make_task("arithmetic", min_digits=1, max_digits=2)
TOKENIZER = CharTokenizer()


def _batches(iterator, n):
    return [next(iterator) for _ in range(n)]


def _segments(row_tokens, row_segments):
    return [row_tokens[row_segments == s] for s in np.unique(row_segments) if s != 0]


def test_packed_pretraining_rows_hold_whole_documents():
    examples = task_examples(TASK, TOKENIZER, seed=0, error_rate=0.0)
    batch = next(iter(packed_batches(examples, seq_len=256, batch_size=4, seed=1)))
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 256) for k in
                                                      ("tokens", "segment_ids", "positions", "loss_mask")}
    np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] != 0)
    for row in range(4):
        segments = _segments(batch["tokens"][row], batch["segment_ids"][row])
        assert len(segments) >= 2  # ~60-token documents are packed several to a row
        for s, ids in enumerate(segments, start=1):
            text = TOKENIZER.decode(ids)
            assert text.startswith("<bos>") and text.endswith("</answer><eos>")
            positions = batch["positions"][row][batch["segment_ids"][row] == s]
            np.testing.assert_array_equal(positions, np.arange(len(ids)))  # restart per document


def test_sft_loss_mask_covers_only_the_response():
    examples = task_examples(TASK, TOKENIZER, seed=0, loss_on_prompt=False)
    batch = next(iter(packed_batches(examples, seq_len=128, batch_size=2, seed=1)))
    for row in range(2):
        for s in np.unique(batch["segment_ids"][row]):
            if s == 0:
                continue
            in_segment = batch["segment_ids"][row] == s
            response = batch["tokens"][row][in_segment & (batch["loss_mask"][row] == 1)]
            prompt = batch["tokens"][row][in_segment & (batch["loss_mask"][row] == 0)]
            assert TOKENIZER.decode(response).startswith("<think>")
            assert TOKENIZER.decode(response).endswith("</answer><eos>")
            assert TOKENIZER.decode(prompt).startswith("<bos>") and "<think>" not in TOKENIZER.decode(prompt)


def test_streams_are_deterministic_and_resume_from_state():
    def make():
        return iter(packed_batches(task_examples(TASK, TOKENIZER, seed=0), seq_len=64, batch_size=2, seed=3))

    first, second = _batches(make(), 3), _batches(make(), 3)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    iterator = make()
    _batches(iterator, 2)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = make()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])


def test_error_rate_changes_solutions_not_problems():
    clean = task_examples(TASK, TOKENIZER, seed=0, error_rate=0.0)
    noisy = task_examples(TASK, TOKENIZER, seed=0, error_rate=1.0)
    clean_text, noisy_text = TOKENIZER.decode(clean[5]["tokens"]), TOKENIZER.decode(noisy[5]["tokens"])
    assert clean_text.split("\n")[0] == noisy_text.split("\n")[0]  # same question
    assert clean_text != noisy_text


def test_rl_prompts_left_padded_and_sharded_by_process():
    def first_batches(batch_size, **shard):
        stream = iter(rl_prompt_batches(TASK, TOKENIZER, seed=0, batch_size=batch_size, prompt_len=48,
                                        template="compact", **shard))
        return [next(stream) for _ in range(2)]

    per_process = [first_batches(8, process_index=i, process_count=2) for i in range(2)]
    for step, one_process in enumerate(first_batches(16)):  # the processes' rows, in order, are the global batch
        for name, rows in one_process.items():
            np.testing.assert_array_equal(np.concatenate([p[step][name] for p in per_process]), rows)
    batches = [p[0] for p in per_process]
    batch = batches[0]
    for row in range(8):
        valid = batch["prompt_segment_ids"][row] == 1
        assert valid[-1] and np.all(np.diff(valid.astype(int)) >= 0)  # padding only on the left
        problem = problem_at(TASK, 0, int(batch["problem_index"][row]))
        assert TOKENIZER.decode(batch["prompt_tokens"][row][valid]) == "<bos>" + TASK.prompt(problem, "compact")
    with pytest.raises(ValueError, match="prompt_len"):
        next(iter(rl_prompt_batches(TASK, TOKENIZER, seed=0, batch_size=2, prompt_len=8)))


def test_examples_longer_than_a_row_are_truncated():
    examples = task_examples(make_task("arithmetic", min_digits=3, max_digits=3), TOKENIZER, seed=0)
    batch = next(iter(packed_batches(examples, seq_len=24, batch_size=2, seed=0)))
    assert batch["tokens"].shape == (2, 24)
    assert TOKENIZER.decode(batch["tokens"][0][batch["segment_ids"][0] == 1]).startswith("<bos>")
