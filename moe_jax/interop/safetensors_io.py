"""Safetensors: lazily sliced reading of a model folder through the `safetensors` package,
streaming sharded writing.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian data. A folder holds `model.safetensors` or shards listed in
`model.safetensors.index.json` (`{"weight_map": {name: file}}`).

Reading goes through `safetensors.safe_open(..., framework="numpy")`, which memory-maps the file
and validates its header (a truncated, garbled or oversized header is refused with a message
naming the file); `SafetensorsFolder.tensor(name)` is a `TensorView`, whose slicing reads only
the requested part through `get_slice`, also after the transposes and axis splits the layout rules
apply — so each device still reads only its own shard. Writing streams tensor by tensor, so a
shard never has to exist in memory at once.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from moe_jax.errors import InputError

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


class TensorView:
    """A tensor of a safetensors file, read lazily, with the numpy view operations the layout
    rules use — `view[index]` (a slice or an integer array per axis), `.T`, `.transpose(axes)`,
    `.reshape` (splitting axes; one that merges axes reads the tensor whole) — none of which reads
    anything; `np.asarray(view)` reads only the bounding box of the selection on each of the file's
    axes, through `get_slice`.

    The file's axis b is split into sub-axes of sizes `groups[b]` (row-major); the view shows
    the sub-axes in the order `shown`, each restricted to the indices `selection[sub-axis]`."""

    def __init__(self, source: Any, base_shape: tuple[int, ...], dtype: np.dtype,
                 groups: tuple[tuple[int, ...], ...] | None = None,
                 shown: tuple[tuple[int, int], ...] | None = None,
                 selection: dict[tuple[int, int], np.ndarray] | None = None):
        self.source, self.base_shape, self.dtype = source, base_shape, dtype
        self.groups = tuple((d,) for d in base_shape) if groups is None else groups
        self.shown = tuple((b, 0) for b in range(len(base_shape))) if shown is None else shown
        self.selection = selection if selection is not None else {
            (b, j): np.arange(d) for b, group in enumerate(self.groups) for j, d in enumerate(group)}
        self.shape = tuple(len(self.selection[axis]) for axis in self.shown)
        self.ndim = len(self.shape)

    def _with(self, **changes: Any) -> TensorView:
        fields = {"groups": self.groups, "shown": self.shown, "selection": self.selection, **changes}
        return TensorView(self.source, self.base_shape, self.dtype, **fields)

    def __getitem__(self, index: Any) -> TensorView:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        selection = dict(self.selection)
        for axis, part in zip(self.shown, index, strict=True):
            if not isinstance(part, slice) and np.ndim(part) != 1:
                raise IndexError("a TensorView takes a slice or a 1-D integer array per axis")
            selection[axis] = selection[axis][part]
        return self._with(selection=selection)

    def transpose(self, *axes: int) -> TensorView:
        axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return self._with(shown=tuple(self.shown[a] for a in (axes or reversed(range(self.ndim)))))

    @property
    def T(self) -> TensorView:
        return self.transpose()

    def reshape(self, *shape: int) -> TensorView | np.ndarray:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        pristine = all(len(self.selection[(b, j)]) == d for b, group in enumerate(self.groups)
                       for j, d in enumerate(group))
        splits, rest = [], list(shape)
        for size in self.shape:  # each shown axis splits into the next dims whose product is its size
            taken = []
            while rest and math.prod(taken) < size:
                taken.append(rest.pop(0))
            while rest and rest[0] == 1 and math.prod(taken) == size:
                taken.append(rest.pop(0))
            splits.append(taken)
        if not pristine or rest or any(math.prod(t) != n for t, n in zip(splits, self.shape, strict=True)):
            return np.asarray(self).reshape(shape)  # a merge across axes: read it whole
        groups = [list(group) for group in self.groups]
        renumber: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for (b, j), taken in sorted(zip(self.shown, splits, strict=True), reverse=True):
            groups[b][j:j + 1] = taken  # right to left, so earlier positions stay valid
        for b, group in enumerate(self.groups):
            offset = 0
            for j, _ in enumerate(group):
                count = len(splits[self.shown.index((b, j))])
                renumber[(b, j)] = [(b, offset + k) for k in range(count)]
                offset += count
        shown = tuple(sub for axis in self.shown for sub in renumber[axis])
        new_groups = tuple(tuple(group) for group in groups)
        selection = {(b, j): np.arange(d) for b, group in enumerate(new_groups) for j, d in enumerate(group)}
        return self._with(groups=new_groups, shown=shown, selection=selection)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if 0 in self.shape:  # nothing to read (the reader refuses empty slices)
            return np.empty(self.shape, dtype or self.dtype)
        box_index, takes, natural = [], [], []
        for b, group in enumerate(self.groups):
            ids = [self.selection[(b, j)] for j in range(len(group))]
            flat = np.ravel_multi_index(np.meshgrid(*ids, indexing="ij"), group).reshape(-1)
            low = int(flat.min())
            box_index.append(slice(low, int(flat.max()) + 1))  # the bounding box on the file's axis b
            takes.append((flat - low, [len(i) for i in ids]))
            natural += [(b, j) for j in range(len(group))]
        box = np.asarray(self.source[tuple(box_index)])  # one axis per file axis
        position = 0  # where file axis b sits once the axes before it are split
        for take, sizes in takes:
            box = np.take(box, take, axis=position)
            box = box.reshape(box.shape[:position] + tuple(sizes) + box.shape[position + 1:])
            position += len(sizes)
        array = box.transpose([natural.index(axis) for axis in self.shown])
        return array if dtype is None else array.astype(dtype)


def _open(path: str) -> Any:
    from safetensors import safe_open  # the maintained reader: it validates the header

    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError, ...: all say the file is unusable
        raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}). Fix: download it "
                         "again (it may be truncated or damaged)") from None


class SafetensorsFolder:
    """All tensors of a Hugging Face model folder, by name, as lazily read `TensorView`s."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e}). Fix: it must be "
                                 'JSON with a "weight_map" of tensor name -> file; download it again') from None
        elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(
                f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}. Fix: point at a Hugging Face "
                "model folder with safetensors weights (PyTorch .bin checkpoints are not read; convert "
                "them with transformers' save_pretrained(..., safe_serialization=True))")
        self.infos: dict[str, TensorInfo] = {}
        self._files: dict[str, Any] = {}
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index_path}: lists {file}, which is not in {folder}. Fix: download it")
            handle = self._files[path] = _open(path)
            for name in handle.keys():  # noqa: SIM118 -- a safetensors handle, not a dict
                info = handle.get_slice(name)
                dtype = info.get_dtype()
                if dtype not in DTYPES:
                    raise InputError(
                        f"{path}: tensor {name!r} has dtype {dtype}, which moe_jax does not load "
                        "(quantized checkpoints, e.g. DeepSeek-V3's FP8 release, are not supported). Fix: "
                        "use a BF16/FP16/FP32 checkpoint, or dequantize this one first")
                self.infos[name] = TensorInfo(path, DTYPES[dtype], tuple(info.get_shape()))

    def names(self) -> set[str]:
        return set(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def tensor(self, name: str) -> TensorView:
        """Tensor `name`, read lazily (nothing is read until it is sliced)."""
        if name not in self.infos:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        info = self.infos[name]
        return TensorView(self._files[info.file].get_slice(name), info.shape, info.dtype)


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
