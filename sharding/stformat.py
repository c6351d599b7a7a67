"""The safetensors file format, read and written by hand.

The `safetensors` Python API writes whole dicts at once and reads through a memory map (whose
touched pages count as resident memory). The shard writer needs the opposite: write the header
first, then stream tensor bytes one tensor at a time; and read tensors with plain file reads so
that memory stays bounded by the tensor in hand. Layout: 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then raw bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class FormatError(ValueError):
    """A file that is not valid safetensors; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes sit in a safetensors file (offsets are absolute)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (the form used in manifests)."""
    return str(dtype).removeprefix("torch.")


def nbytes(shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor table and `__metadata__` of a safetensors file, checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = _header_length(path, f.read(8), size)
            body = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read safetensors header ({e})") from e
    return _parse_header(path, body, size)


def parse_header(path: Path, data: Any) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """`read_header` of a whole file already in memory (bytes, memoryview or mmap) named
    `path`, so that the table is read from exactly the bytes that were checked."""
    size = len(data)
    n = _header_length(path, bytes(data[:8]), size)
    return _parse_header(path, bytes(data[8: 8 + n]), size)


def _header_length(path: Path, head: bytes, size: int) -> int:
    if len(head) < 8:
        raise FormatError(f"{path}: truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise FormatError(f"{path}: corrupt safetensors header length {n}")
    return int(n)


def _parse_header(path: Path, body: bytes,
                  size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read safetensors header ({e})") from e
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    meta = raw.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    base = 8 + len(body)
    for name, info in raw.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            a, b = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: bad header entry for {name} ({e!r})") from e
        if b - a != nbytes(shape, dtype) or a < 0 or base + b > size:
            raise FormatError(f"{path}: tensor {name} lies outside the file (truncated?)")
        tensors[name] = TensorInfo(dtype, shape, base + a, base + b)
    return tensors, meta


def header_bytes(entries: list[tuple[str, torch.dtype, list[int]]],
                 metadata: dict[str, str]) -> tuple[bytes, list[tuple[int, int]]]:
    """Header (length prefix included, padded to 8 bytes) for tensors laid out in order, and
    each tensor's [start, stop) relative to the data section."""
    table: dict[str, Any] = {"__metadata__": metadata}
    offsets: list[tuple[int, int]] = []
    pos = 0
    for name, dtype, shape in entries:
        end = pos + nbytes(shape, dtype)
        table[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, end]}
        offsets.append((pos, end))
        pos = end
    body = json.dumps(table, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, offsets


def read_tensor(f: BinaryIO, info: TensorInfo, row_start: int = 0, row_stop: int | None = None,
                buf: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [row_start, row_stop) of a tensor (all of it by default) with one plain read, into
    the front of uint8 buffer `buf` when given (the result is then a view of `buf`)."""
    shape = list(info.shape)
    if not shape:
        row_stop, row_bytes = 1, info.stop - info.start
    else:
        row_stop = shape[0] if row_stop is None else row_stop
        row_bytes = nbytes(shape[1:], info.dtype)
        shape[0] = row_stop - row_start
    count = (row_stop - row_start) * row_bytes
    buf = torch.empty(count, dtype=torch.uint8) if buf is None else buf[:count]
    f.seek(info.start + row_start * row_bytes)
    if count and f.readinto(memoryview(buf.numpy())) != count:  # type: ignore[attr-defined]
        raise OSError(f"short read of {count} bytes")
    return buf.view(info.dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
