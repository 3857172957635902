"""A small safetensors reader that reads each tensor straight into its own buffer.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets),
then the raw data. Reading with `readinto` instead of memory-mapping keeps the process from holding the file's
pages and the loaded copy at once, which is what keeps peak host memory near the checkpoint's size. Every
offset is checked against the file size first, so a truncated file is reported by name before any read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """An open safetensors file: names, shapes and metadata from the header; tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot be opened ({exc.strerror})") from None
        try:
            self._parse_header()
        except BaseException:
            self._f.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file ({what})")

    def _parse_header(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        raw = self._f.read(8)
        if len(raw) < 8:
            raise self._fail("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise self._fail(f"header of {n} bytes does not fit in a file of {size} bytes: truncated?")
        try:
            header = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._fail("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"entry for tensor {name!r} is malformed") from None
            expected = dtype.itemsize * _numel(shape)
            if end - begin != expected or begin < 0:
                raise self._fail(
                    f"tensor {name!r}: {end - begin} bytes stored for shape {list(shape)} of {info['dtype']}"
                )
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ends at byte {self._data_start + end} but the file has "
                    f"{size} bytes: the file is truncated"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            self._f.seek(self._data_start + begin)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            got = self._f.readinto(view)
            if got != end - begin:
                raise CheckpointError(f"{self.path}: tensor {name!r}: read {got} of {end - begin} bytes: truncated?")
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
