"""Tensor-by-tensor safetensors reading and streaming writing, with errors that name the file and tensor.

We parse the (documented, 8-byte-length + JSON) header ourselves instead of using `safetensors.safe_open`:
its numpy backend has no bfloat16, and its other backends keep a whole shard mapped (and resident) while
the file is open, which breaks the "peak RSS near the model size" goal. Each tensor here is mapped, copied
into its own buffer and unmapped before the next one.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file, tensor or key."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses one file's header and checks every tensor's byte range against the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated file ({size} bytes), no safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} does not fit the {size}-byte file "
                                      "(truncated or not a safetensors file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); not a safetensors file?") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; not a safetensors file?")
    base = 8 + n
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in (*shape, start, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {meta!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - start != expected:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - start} bytes but {dtype}{list(shape)} "
                                  f"needs {expected}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} needs bytes up to {base + end} "
                                  f"but the file has {size}")
        infos[name] = TensorInfo(path, name, dtype, shape, base + start, base + end)
    return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor into its own (writable) numpy buffer; nothing stays mapped afterwards."""
    dtype = DTYPES[info.dtype]
    count = int(np.prod(info.shape, dtype=np.int64))
    with open(info.file, "rb") as f:
        f.seek(info.start)
        out = aligned_empty(count, dtype)
        got = f.readinto(memoryview(out.view(np.uint8)))
    if got != info.end - info.start:
        raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
    return out.reshape(info.shape)


class TensorIndex:
    """All tensors of a checkpoint (one or more files) by name."""

    def __init__(self, files: Iterable[str]):
        self.files = list(files)
        self.infos: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_header(path).items():
                if name in self.infos:
                    raise CheckpointError(f"tensor {name!r} appears in both {self.infos[name].file} and {path}")
                self.infos[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> set[str]:
        return set(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.infos[name])


def aligned_empty(count: int, dtype, align: int = 64) -> np.ndarray:
    """A 1-D buffer whose data starts on an `align`-byte boundary. jax.device_put on CPU adopts such a buffer
    without copying it, while an unaligned one is copied: at load that copy is a transient second model."""
    dtype = np.dtype(dtype)
    raw = np.empty(count * dtype.itemsize + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + count * dtype.itemsize].view(dtype)


def aligned(arr: np.ndarray) -> np.ndarray:
    """`arr` as a C-contiguous, 64-byte-aligned array (copied only when it is not one already)."""
    if arr.flags.c_contiguous and arr.ctypes.data % 64 == 0:
        return arr
    out = aligned_empty(arr.size, arr.dtype).reshape(arr.shape)
    np.copyto(out, arr)
    return out


def find_nonfinite(x: np.ndarray, chunk: int = 1 << 22) -> int | None:
    """Flat index of the first NaN/Inf in a float array (bit test, cheap for bf16), else None.

    Checked in chunks so the temporaries stay a few MiB instead of two more copies of a 1 GiB embedding."""
    if x.dtype == np.dtype(ml_dtypes.bfloat16) or x.dtype == np.float16:
        flat = x.reshape(-1).view(np.uint16)
        mask = np.uint16(0x7C00) if x.dtype == np.float16 else np.uint16(0x7F80)

        def bad(part):
            return np.flatnonzero((part & mask) == mask)
    elif x.dtype in (np.float32, np.float64):
        flat = x.reshape(-1)

        def bad(part):
            return np.flatnonzero(~np.isfinite(part))
    else:
        return None
    for start in range(0, flat.size, chunk):
        hits = bad(flat[start : start + chunk])
        if hits.size:
            return start + int(hits[0])
    return None


def write_file(path: str, tensors: list[tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]],
               metadata: dict[str, str] | None = None) -> None:
    """Streams tensors to a safetensors file: (name, dtype code, shape, producer) are produced one by one."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in tensors:
            arr = np.require(produce(), requirements="C")  # (ascontiguousarray turns 0-d into 1-d)
            if arr.dtype != DTYPES[dtype] or tuple(arr.shape) != tuple(shape):
                raise AssertionError(f"{name}: produced {arr.dtype}{arr.shape}, declared {dtype}{shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
