"""grain pipelines: packed pretraining rows of the synthetic tasks, SFT rows with the loss on the
response only (from a task stream or from dataset files, `moe_jax.data.records`), and RL prompt
batches.

Problem `i` of a task stream is generated from the seed sequence `(seed, i)`, so the source is
random-access: grain shuffles, shards by process and checkpoints it by index (the iterator's
`get_state()` / `set_state()` is a few integers), and the same seed gives the same stream.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import grain.experimental as grain_experimental
import jax
import numpy as np

from moe_jax.data.records import JSONL_SUFFIX, dataset_files, load_records, tokenized_example
from moe_jax.data.tasks import Problem, Task
from moe_jax.data.tokenizer import Tokenizer

STREAM_LENGTH = 1 << 30  # problems per synthetic stream (lazily generated; effectively endless)


def problem_at(task: Task, seed: int, index: int) -> Problem:
    """Problem `index` of the stream `seed`: the same pair always gives the same problem."""
    return task.generate(np.random.default_rng([seed, index]))


def _example(task: Task, tokenizer: Tokenizer, seed: int, index: int, error_rate: float,
             template: str, loss_on_prompt: bool) -> dict[str, np.ndarray]:
    """bos + prompt + completion + eos, with the loss mask on the completion (and on the prompt
    too for pretraining documents)."""
    problem = problem_at(task, seed, index)
    # The solution's slips get their own stream, so error_rate never changes the problems.
    completion = task.completion(problem, np.random.default_rng([seed, index, 1]), error_rate)
    prompt = prompt_ids(task, tokenizer, problem, template)
    completion_ids = tokenizer.encode(completion, add_eos=True)
    mask = [int(loss_on_prompt)] * len(prompt) + [1] * len(completion_ids)
    return {"tokens": np.asarray(prompt + completion_ids, np.int32),
            "loss_mask": np.asarray(mask, np.int32)}


def task_examples(task: Task, tokenizer: Tokenizer, *, seed: int, error_rate: float = 0.0,
                  template: str = "compact", loss_on_prompt: bool = True) -> grain.MapDataset:
    """A random-access dataset of tokenized examples: pretraining documents
    (`loss_on_prompt=True`, the default) or SFT pairs (`False`: loss on the response only)."""
    return grain.MapDataset.range(STREAM_LENGTH).map(
        lambda i: _example(task, tokenizer, seed, int(i), error_rate, template, loss_on_prompt))


def record_examples(pattern: str, tokenizer: Tokenizer, *, seq_len: int, loss_on_prompt: bool = False
                    ) -> grain.MapDataset:
    """A random-access dataset of tokenized records from dataset files (a path or glob): SFT pairs
    with the loss on the response (and `loss_weight`, the record's weight). JSON Lines records
    are all checked now (a record longer than `seq_len` fails naming its line); ArrayRecord ones
    as they are read."""
    records = load_records(pattern)
    to_example = functools.partial(tokenized_example, tokenizer=tokenizer, seq_len=seq_len,
                                   loss_on_prompt=loss_on_prompt)
    if dataset_files(pattern)[0].endswith(JSONL_SUFFIX):
        for index in range(len(records)):
            to_example(records[index])
    return records.map(to_example)


def _process_shard(dataset: grain.MapDataset, process_index: int | None,
                   process_count: int | None) -> grain.MapDataset:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return dataset[index::count]


def _rename_packed(batch: dict[str, np.ndarray], fields: Sequence[str]) -> dict[str, np.ndarray]:
    segment_ids = batch["tokens_segment_ids"]
    renamed = {"tokens": batch["tokens"], "segment_ids": segment_ids, "positions": batch["tokens_positions"],
               "loss_mask": batch["loss_mask"] * (segment_ids != 0)}
    if "loss_weight" in batch:
        renamed["loss_weight"] = batch["loss_weight"] * (segment_ids != 0)
    return {**renamed, **{name: batch[name] for name in fields}}


def packed_batches(examples: grain.MapDataset, *, seq_len: int, batch_size: int, seed: int,
                   shuffle: bool = True, process_index: int | None = None,
                   process_count: int | None = None, weighted: bool = False, repeat: bool = False,
                   fields: Sequence[str] = ()) -> grain.IterDataset:
    """Examples packed first-fit into rows of `seq_len` tokens (longer ones are truncated: task
    streams only; dataset records are checked to fit), batched.

    Each batch holds `tokens`, `segment_ids` (1, 2, … per document, 0 = padding), `positions`
    (restarting per document) and `loss_mask` `[batch_size, seq_len]` (and `loss_weight` when
    `weighted`: examples from `record_examples`); this process reads only its
    `1/process_count` of the stream. With `repeat` a finite dataset (records on disk) is read
    epoch after epoch, each in a fresh order (grain reshuffles a repeated shuffle per epoch).
    `fields` names further per-token arrays of the examples (`[L, ...]`, e.g. a teacher's top-k)
    packed alongside the tokens (zeros at padding)."""
    dataset = examples.shuffle(seed=seed) if shuffle else examples
    dataset = dataset.repeat(None) if repeat else dataset
    dataset = _process_shard(dataset, process_index, process_count)
    # The packer rejects an example longer than a row: cut it to the row (its tail is lost).
    dataset = dataset.map(lambda example: {k: v[:seq_len] for k, v in example.items()}).to_iter_dataset()
    packed = grain_experimental.FirstFitPackIterDataset(
        dataset, length_struct={name: seq_len for name in (*("tokens", "loss_mask", "loss_weight")[:2 + weighted],
                                                           *fields)},
        num_packing_bins=batch_size, shuffle_bins=False)
    return packed.batch(batch_size, drop_remainder=True).map(functools.partial(_rename_packed, fields=tuple(fields)))


def prompt_ids(task: Task, tokenizer: Tokenizer, problem: Problem, template: str) -> list[int]:
    """bos + the tokens of `problem`'s prompt."""
    return tokenizer.encode(task.prompt(problem, template), add_bos=True)


def left_padded_prompts(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment ids) `[B, P]`, P the longest prompt: every prompt ends in the last slot."""
    width = max(map(len, prompts))
    tokens_BxP = np.full((len(prompts), width), pad_id, np.int32)
    segment_ids_BxP = np.zeros((len(prompts), width), np.int32)
    for row, ids in enumerate(prompts):
        tokens_BxP[row, width - len(ids):] = ids
        segment_ids_BxP[row, width - len(ids):] = 1
    return tokens_BxP, segment_ids_BxP


def longest_prompt(task: Task, tokenizer: Tokenizer, *, seed: int, template: str, count: int = 512) -> int:
    """The most tokens any of the first `count` prompts of stream `seed` takes: what a prompt
    budget must hold, checked before anything compiles."""
    return max(len(prompt_ids(task, tokenizer, problem_at(task, seed, i), template)) for i in range(count))


def _prompt_row(task: Task, tokenizer: Tokenizer, seed: int, index: int, prompt_len: int,
                template: str) -> dict[str, np.ndarray]:
    ids = prompt_ids(task, tokenizer, problem_at(task, seed, index), template)
    if len(ids) > prompt_len:
        raise ValueError(f"prompt of problem {index} has {len(ids)} tokens > prompt_len={prompt_len} (a row's "
                         "seq_len - sampling.max_new_tokens). Fix: raise seq_len or lower sampling.max_new_tokens")
    pad = prompt_len - len(ids)  # left padding: every prompt ends at the same slot
    return {"prompt_tokens": np.asarray([tokenizer.pad_id] * pad + ids, np.int32),
            "prompt_segment_ids": np.asarray([0] * pad + [1] * len(ids), np.int32),
            "problem_index": np.asarray(index, np.int64)}


def rl_prompt_order(seed: int) -> grain.MapDataset:
    """The problem indices of stream `seed` in the order RL serves them: global row `j` of the
    run's prompt batches (every process's rows together) is problem `rl_prompt_order(seed)[j]`."""
    return grain.MapDataset.range(STREAM_LENGTH).shuffle(seed=seed)


def rl_prompt_batches(task: Task, tokenizer: Tokenizer, *, seed: int, batch_size: int,
                      prompt_len: int, template: str = "r1_zero", process_index: int | None = None,
                      process_count: int | None = None) -> grain.IterDataset:
    """Batches of left-padded prompts with the index of their problem (`problem_at(task, seed,
    index)` rebuilds it with its verifier data). `batch_size` is this process's share."""
    dataset = _process_rows_of_global_batches(rl_prompt_order(seed), batch_size, process_index, process_count).map(
        lambda i: _prompt_row(task, tokenizer, seed, int(i), prompt_len, template))
    # Built inline: a step's few prompt rows take ~1 ms, and grain's default 16 prefetch threads
    # competed with XLA for the CPU (GRPO bench on 2 cores: sampling 31 -> 28 ms).
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(batch_size, drop_remainder=True)


def _process_rows_of_global_batches(dataset: grain.MapDataset, local_batch: int, process_index: int | None,
                                    process_count: int | None) -> grain.MapDataset:
    """This process's rows of each global batch of `local_batch * process_count` consecutive
    records: rows `[p·b, (p+1)·b)`, the order `global_batch_array` assembles. So the global batch
    of every step, and what is sampled from it, is the same whatever the number of processes."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    global_batch = local_batch * count

    def record(j: int):
        return dataset[(j // local_batch) * global_batch + index * local_batch + j % local_batch]

    return grain.MapDataset.range(len(dataset) // count).map(record)
