"""The teacher: any run (its workdir) or a Hugging Face folder, loaded once on the student's mesh
with its parameters frozen (no optimizer, never donated), and its next-token distributions as
their top-k (ids, log-probs) — from one jitted forward over a whole batch, or from a cache written
once beside the traces (MaxText's idea: an epoch never re-runs the teacher).

The cache is an ArrayRecord file, one record per dataset record (same order): the int32 ids and
then the float32 log-probs, `[L, k]` each, where L is the record's token count (bos + prompt +
response + eos, as `record_examples` tokenizes it). A record's teacher distributions depend on
its tokens alone (attention never crosses documents and positions restart per document), so they
are packed into training rows with the tokens (`packed_batches(..., fields=TEACHER_FIELDS)`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping

import grain
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moe_jax.configs import ModelConfig
from moe_jax.data.pipelines import record_examples
from moe_jax.data.tokenizer import Tokenizer, load_tokenizer
from moe_jax.distill.losses import teacher_topk
from moe_jax.errors import InputError
from moe_jax.models import Transformer
from moe_jax.parallel.distributed import (
    all_rows,
    global_batch_array,
    is_lead,
    local_rows,
    process_batch_slice,
)
from moe_jax.parallel.rules import Rules
from moe_jax.train import config_tree
from moe_jax.train import workdir as workdir_format
from moe_jax.train.context import load_model
from moe_jax.train.step import jit_over_mesh

TEACHER_FIELDS = ("teacher_ids", "teacher_logp")  # per-token `[T, k]` fields of a logit-KD batch
CACHE_FILE, CACHE_INFO_FILE = "topk.array_record", "topk.json"


@dataclasses.dataclass
class Teacher:
    """A frozen teacher: its model (in its shardings), tokenizer and where it came from."""

    model: Transformer
    tokenizer: Tokenizer
    source: str


def teacher_model_config(source: str) -> ModelConfig:
    """The architecture of the run in a workdir (its `config.json`) or of `hf:<folder>`."""
    if source.startswith("hf:"):
        from moe_jax.interop import read_hf_config  # only a Hugging Face teacher pays the import

        return read_hf_config(source.removeprefix("hf:"))[0]
    saved = workdir_format.read_config(source)
    if saved is None or "model" not in saved:
        raise InputError(f"teacher.source={source}: no run's config.json there. Fix: give a run's workdir "
                         "(e.g. an R1 pipeline's DIR/final_rl) or hf:<folder>")
    return config_tree.build(ModelConfig, saved["model"])


def teacher_tokenizer(source: str) -> Tokenizer:
    """The tokenizer the teacher was trained with: its workdir's copy, its run's setting, or the
    Hugging Face folder's `tokenizer.json`."""
    if source.startswith("hf:"):
        return load_tokenizer(source.removeprefix("hf:"))
    saved = workdir_format.read_config(source) or {}
    copy = os.path.join(source, workdir_format.TOKENIZER_FILE)
    return load_tokenizer(copy if os.path.isfile(copy) else saved.get("tokenizer", "char"))


def load_teacher(source: str, mesh: Mesh, rules: Rules | None = None, compute_dtype: str = "auto") -> Teacher:
    """The teacher `source` names, born in its shardings on `mesh` and loaded from its newest
    checkpoint (or Hugging Face weights)."""
    if not os.path.exists(source.removeprefix("hf:")):
        raise InputError(f"teacher.source={source}: no such run or folder. Fix: give a run's workdir or hf:<folder>")
    model = load_model(teacher_model_config(source), source, mesh, rules, compute_dtype)
    return Teacher(model, teacher_tokenizer(source), source)


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give every id the same token (so their logits line up)."""
    return a.vocab_size == b.vocab_size and all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def check_vocabulary(teacher: Tokenizer, student: Tokenizer, mode: str) -> None:
    """Logit and on-policy KD compare distributions over token ids: the vocabularies must be one.
    Sequence-level KD reads the teacher's text, so any student tokenizer will do."""
    if mode != "sequence" and not same_vocabulary(teacher, student):
        raise InputError(f"kd.mode={mode}: the teacher's vocabulary ({teacher.vocab_size} ids) is not the "
                         f"student's ({student.vocab_size} ids), so their next-token distributions cannot be "
                         "compared. Fix: give the student the teacher's tokenizer (--config.pipeline.tokenizer), "
                         "or use --config.kd.mode=sequence (SFT on the teacher's text)")


def topk_width(k: int, vocab_size: int) -> int:
    """The cached width: `k`, or the whole vocabulary for k = 0 (or k ≥ V)."""
    return vocab_size if k <= 0 or k >= vocab_size else k


def make_topk_fn(teacher: Teacher, k: int, mesh: Mesh, rules: Rules | None = None
                 ) -> Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]:
    """`topk(batch) -> {"teacher_ids", "teacher_logp"}` `[B, T, k]`: one jitted teacher forward
    over a batch (`tokens`, `segment_ids`, `positions`, batch-sharded on `mesh`), without MTP heads
    and without a gradient. k = 0 keeps the whole vocabulary."""
    graphdef, state = nnx.split(teacher.model)
    width = topk_width(k, teacher.model.cfg.vocab_size)

    def topk(state: nnx.State, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        logits, _ = nnx.merge(graphdef, state)(batch["tokens"], segment_ids_BxT=batch["segment_ids"],
                                               positions_BxT=batch["positions"], mtp=False)
        ids, logp = teacher_topk(jax.lax.stop_gradient(logits), width)
        return {"teacher_ids": ids, "teacher_logp": logp}

    jitted = jit_over_mesh(topk, state, mesh, donate=False, rules=rules)
    return lambda batch: jitted(state, {name: batch[name] for name in ("tokens", "segment_ids", "positions")})


def _record_rows(examples: list[dict[str, np.ndarray]], seq_len: int, rows: int) -> dict[str, np.ndarray]:
    """One record per row, right-padded to `seq_len` (segment 0), padded to `rows` rows."""
    tokens, segments = np.zeros((rows, seq_len), np.int32), np.zeros((rows, seq_len), np.int32)
    for r, example in enumerate(examples):
        tokens[r, :len(example["tokens"])] = example["tokens"]
        segments[r, :len(example["tokens"])] = 1
    positions = np.where(segments > 0, np.arange(seq_len, dtype=np.int32), 0)
    return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def write_topk_cache(teacher: Teacher, traces: str, directory: str, *, k: int, seq_len: int, mesh: Mesh,
                     rules: Rules | None = None, rows: int = 64) -> dict[str, object]:
    """The teacher's top-k over every record of `traces` into `directory/topk.array_record`
    (written atomically, then `topk.json`: k, records, tokens, bytes); `rows` records per jitted
    forward (one compiled shape). Every process computes its rows of each batch; the lead writes."""
    from array_record.python.array_record_module import ArrayRecordWriter

    examples = record_examples(traces, teacher.tokenizer, seq_len=seq_len)
    topk_fn = make_topk_fn(teacher, k, mesh, rules)
    rows += -rows % jax.device_count()
    local = process_batch_slice(rows)
    lead = is_lead()
    path = os.path.join(directory, CACHE_FILE)
    if lead:
        os.makedirs(directory, exist_ok=True)
    writer = ArrayRecordWriter(path + ".tmp", "group_size:1") if lead else None
    tokens = 0
    try:
        for start in range(0, len(examples), rows):
            chunk = [examples[i] for i in range(start, min(start + rows, len(examples)))]
            batch = _record_rows(chunk, seq_len, rows)
            out = topk_fn({name: global_batch_array(rows_[local], mesh) for name, rows_ in batch.items()})
            out = all_rows(local_rows(out, mesh))
            for r, example in enumerate(chunk):
                length = len(example["tokens"])
                tokens += length
                if writer is not None:
                    writer.write(out["teacher_ids"][r, :length].tobytes() + out["teacher_logp"][r, :length].tobytes())
    finally:
        if writer is not None:
            writer.close()
    width = topk_width(k, teacher.model.cfg.vocab_size)
    info = {"k": width, "records": len(examples), "tokens": tokens, "bytes": tokens * width * 8,
            "bytes_per_token": width * 8, "full_logits_bytes_per_token": teacher.model.cfg.vocab_size * 4,
            "traces": traces, "teacher": teacher.source}
    if lead:
        os.replace(path + ".tmp", path)
        workdir_format.write_text_atomically(os.path.join(directory, CACHE_INFO_FILE), json.dumps(info, indent=2))
    return info


def cached_examples(traces: str, directory: str, tokenizer: Tokenizer, *, seq_len: int, k: int | None = None
                    ) -> grain.MapDataset:
    """The traces' tokenized examples, each with its cached `teacher_ids` / `teacher_logp` `[L, k]`
    (a cache that does not match the traces, or holds another `k` than asked, fails naming the fix)."""
    info = workdir_format.read_json(os.path.join(directory, CACHE_INFO_FILE))
    examples = record_examples(traces, tokenizer, seq_len=seq_len)
    fix = f"delete {directory} so that it is rebuilt from these traces"
    if info is None:
        raise InputError(f"{directory}: no finished top-k cache ({CACHE_INFO_FILE} missing). Fix: {fix}")
    if k is not None and info["k"] != k:
        raise InputError(f"{directory}: the top-k cache holds k={info['k']}, the run asks for k={k}. Fix: {fix}, or "
                         f"set kd.top_k={info['k']}")
    if info["records"] != len(examples):
        raise InputError(f"{directory}: the top-k cache holds {info['records']} records, the traces {traces} "
                         f"{len(examples)}. Fix: {fix}")
    cache = grain.sources.ArrayRecordDataSource([os.path.join(directory, CACHE_FILE)])
    k = info["k"]

    def with_topk(index: int) -> dict[str, np.ndarray]:
        example, blob = examples[index], cache[index]
        length = len(example["tokens"])
        if len(blob) != length * k * 8:
            raise InputError(f"{directory}: cache record {index} holds {len(blob)} bytes, not {length}×{k}×8 for "
                             f"its {length} tokens. Fix: {fix}")
        ids = np.frombuffer(blob[:length * k * 4], np.int32).reshape(length, k)
        logp = np.frombuffer(blob[length * k * 4:], np.float32).reshape(length, k)
        return {**example, "teacher_ids": ids, "teacher_logp": logp}

    return grain.MapDataset.range(len(examples)).map(lambda i: with_topk(int(i)))
