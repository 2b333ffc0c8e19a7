"""Safetensors without torch: memory-mapped reading of a model folder, streaming sharded writing.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian data, offsets relative to its start. A folder holds `model.safetensors`
or shards listed in `model.safetensors.index.json` (`{"weight_map": {name: file}}`).

Reading maps every file with `np.memmap`; `SafetensorsFolder.tensor(name)` is a read-only numpy
view, so slicing it reads (pages in) only that slice. Writing streams tensor by tensor, so a shard
never has to exist in memory at once.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype ("F32", "BF16", ...)."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors name; "
                         f"use one of {sorted(map(str, _NAMES))}") from None


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file (absolute offsets) and its `__metadata__`."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}, which moe_jax does not load "
                "(quantized checkpoints, e.g. DeepSeek-V3's FP8 release, are not supported). Fix: "
                "use a BF16/FP16/FP32 checkpoint, or dequantize this one first")
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(path, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                   8 + n + begin, 8 + n + end)
    return tensors, metadata


class SafetensorsFolder:
    """All tensors of a Hugging Face model folder, by name, as lazily read numpy views."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(
                f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}. Fix: point at a Hugging Face "
                "model folder with safetensors weights (PyTorch .bin checkpoints are not read; convert "
                "them with transformers' save_pretrained(..., safe_serialization=True))")
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            tensors, _ = read_header(os.path.join(folder, file))
            self.infos.update(tensors)
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> set[str]:
        return set(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def tensor(self, name: str) -> np.ndarray:
        """A read-only, memory-mapped view of tensor `name` (nothing is read until it is sliced)."""
        if name not in self.infos:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        info = self.infos[name]
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        raw = self._maps[info.file][info.begin:info.end]
        return raw.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its shape and dtype up front, the data only when `produce()` is called."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _write_file(path: str, tensors: Sequence[PendingTensor], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            data = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if data.shape != t.shape:
                raise ValueError(f"{t.name}: produced shape {data.shape}, declared {t.shape}")
            f.write(data.tobytes())
    os.replace(path + ".tmp", path)


def plan_shards(tensors: Iterable[PendingTensor], max_shard_bytes: int) -> list[list[PendingTensor]]:
    """Consecutive groups of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_folder(folder: str, tensors: Sequence[PendingTensor], max_shard_bytes: int) -> list[str]:
    """Write `tensors` as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` when they exceed `max_shard_bytes`. Returns the files written."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError("duplicate tensor names: " + ", ".join(duplicates))
    os.makedirs(folder, exist_ok=True)
    metadata = {"format": "pt"}  # what transformers expects of a safetensors checkpoint
    shards = plan_shards(tensors, max_shard_bytes)
    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    if len(shards) == 1:
        _write_file(os.path.join(folder, SINGLE_FILE), shards[0], metadata)
        return [SINGLE_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards, strict=True):
        _write_file(os.path.join(folder, file), shard, metadata)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": {t.name: file for file, shard in zip(files, shards, strict=True) for t in shard}}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return files
