"""Datasets on disk: records of `prompt`, `response` and optional `task`, `problem`, `source`,
`weight` — the SFT format every stage reads and writes (rejection samples, teacher traces).

- JSON Lines (`.jsonl`): one JSON object per line, for a person to read; validated whole when
  opened, so a bad record fails before anything is written or compiled.
- ArrayRecord (`.array_record`): the same objects as UTF-8 JSON, one per record, for large sets;
  read with grain (random access, a checkpointable position, sharded by process), each record
  checked as it is read.

Every error names the file, the line (or record), the field and the fix.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from moe_jax.data.tokenizer import Tokenizer
from moe_jax.errors import InputError

REQUIRED_FIELDS = ("prompt", "response")
OPTIONAL_TEXT_FIELDS = ("task", "source")
OPTIONAL_FIELDS = (*OPTIONAL_TEXT_FIELDS, "problem", "weight")
JSONL_SUFFIX, ARRAY_RECORD_SUFFIX = ".jsonl", ".array_record"


class DatasetError(InputError):
    """A dataset file the user gave is unusable: the message names the file, the place and the fix."""


def _error(where: str, problem: str, fix: str) -> DatasetError:
    return DatasetError(f"{where}: {problem}. Fix: {fix}")


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """The record as a dict, or a DatasetError naming `where` (file:line) and the field."""
    if not isinstance(record, dict):
        raise _error(where, f"a record must be a JSON object, got {type(record).__name__}",
                     'write one object per line: {"prompt": ..., "response": ...}')
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise _error(where, f"missing field {name!r}", f"give every record {' and '.join(REQUIRED_FIELDS)}")
    for name in (*REQUIRED_FIELDS, *OPTIONAL_TEXT_FIELDS):
        if name in record and not isinstance(record[name], str):
            raise _error(where, f"field {name!r} must be a string, got {type(record[name]).__name__}",
                         f"write {name} as a JSON string")
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise _error(where, f"unknown field(s) {unknown}", f"use only {REQUIRED_FIELDS + OPTIONAL_FIELDS}")
    weight = record.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise _error(where, f"field 'weight' must be a finite number >= 0, got {weight!r}",
                     "give a loss weight such as 1.0, or leave the field out")
    return record


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every record of a JSON Lines file, validated (blank lines are skipped)."""
    return [record for _, record in _numbered_jsonl(path)]


def _numbered_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, validated record) of every non-blank line of a JSON Lines file."""
    records = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _error(where, f"not UTF-8 (byte {e.start})", "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _error(where, f"not JSON ({e.msg}, column {e.colno})", "write one JSON object per line") from None
            records.append((line_no, validate_record(record, where)))
    if not records:
        raise _error(path, "no records", "give a file with at least one JSON object per line")
    return records


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Write validated records atomically (a kill leaves the old file or none); returns the count."""
    count = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for count, record in enumerate(records, start=1):
            f.write(json.dumps(validate_record(dict(record), f"record {count}"), ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return count


def write_array_record(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """The records as an ArrayRecord file (UTF-8 JSON per record), written atomically."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer, count = ArrayRecordWriter(path + ".tmp", "group_size:1"), 0
    try:
        for count, record in enumerate(records, start=1):
            writer.write(json.dumps(validate_record(dict(record), f"record {count}")).encode("utf-8"))
    finally:
        writer.close()
    os.replace(path + ".tmp", path)
    return count


def dataset_files(pattern: str) -> list[str]:
    """The files a `data` setting names (a path or a glob), sorted; each must be JSONL or
    ArrayRecord, and all of one kind."""
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not paths or not all(os.path.isfile(p) for p in paths):
        missing = pattern if not paths else next(p for p in paths if not os.path.isfile(p))
        raise _error(missing, "no such file", "give an existing .jsonl / .array_record file or a glob of them")
    kinds = {os.path.splitext(p)[1] for p in paths}
    if not kinds <= {JSONL_SUFFIX, ARRAY_RECORD_SUFFIX} or len(kinds) != 1:
        raise _error(pattern, f"files of kind(s) {sorted(kinds)}",
                     f"give only {JSONL_SUFFIX} files or only {ARRAY_RECORD_SUFFIX} files")
    return paths


class _ArrayRecords(grain.sources.RandomAccessDataSource):
    """ArrayRecord files as validated record dicts, each error naming its file and record."""

    def __init__(self, paths: Sequence[str]):
        self.source = grain.sources.ArrayRecordDataSource(list(paths))
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        where = self._where(index)
        try:
            record = json.loads(self.source[index].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _error(where, f"not UTF-8 JSON ({e})", "write records with moe_jax.data.records") from None
        return {**validate_record(record, where), "_where": where}

    def _where(self, index: int) -> str:
        """`<file> record <i>`: the file holding global record `index` and its place in it."""
        for path in self.paths:
            count = len(grain.sources.ArrayRecordDataSource([path]))
            if index < count:
                return f"{path} record {index}"
            index -= count
        return f"record {index} past the end of {self.paths}"


def load_records(pattern: str) -> grain.MapDataset:
    """A random-access dataset of the records in the files `pattern` names (JSONL: read and
    validated now; ArrayRecord: read and validated record by record)."""
    paths = dataset_files(pattern)
    if paths[0].endswith(JSONL_SUFFIX):
        records = []
        for path in paths:
            records += [{**record, "_where": f"{path}:{line}"} for line, record in _numbered_jsonl(path)]
        return grain.MapDataset.source(records)
    return grain.MapDataset.source(_ArrayRecords(paths))


def tokenized_example(record: Mapping[str, Any], tokenizer: Tokenizer, *, seq_len: int,
                      loss_on_prompt: bool = False) -> dict[str, np.ndarray]:
    """bos + prompt + response + eos with the loss mask on the response (and the prompt when
    `loss_on_prompt`), and `loss_weight` (the record's `weight`) on every token; a record longer
    than `seq_len` is an error, never cut."""
    prompt_ids = tokenizer.encode(record["prompt"], add_bos=True)
    response_ids = tokenizer.encode(record["response"], add_eos=True)
    length = len(prompt_ids) + len(response_ids)
    if length > seq_len:
        where = record.get("_where", "a record")
        raise _error(where, f"{length} tokens > seq_len={seq_len} (it would be cut)",
                     f"raise --config.seq_len to at least {length}, or drop or shorten the record")
    mask = [int(loss_on_prompt)] * len(prompt_ids) + [1] * len(response_ids)
    return {"tokens": np.asarray(prompt_ids + response_ids, np.int32), "loss_mask": np.asarray(mask, np.int32),
            "loss_weight": np.full(length, record.get("weight", 1.0), np.float32)}
