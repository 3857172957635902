"""Writing GPTQ checkpoints exactly as AutoGPTQ lays them out, atomically.

Everything is written into a temporary directory beside the target and renamed into place at the end, so
an interrupted write leaves nothing behind. Tensors can be handed over one at a time while they are being made
(`CheckpointWriter`): they go to disk at once, so a quantizer never holds the whole output in memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import QuantizeConfig
from .errors import GPTQBridgeError
from .safetensors_io import DTYPES


def safetensors_metadata(config: QuantizeConfig) -> dict[str, str]:
    """The header metadata AutoGPTQ writes beside the tensors."""
    return {
        "format": "pt",
        "gptq_bits": str(config.bits),
        "gptq_group_size": str(config.group_size),
        "gptq_desc_act": str(config.desc_act),
        "gptq_damp_percent": str(config.damp_percent),
        "gptq_checkpoint_format": config.checkpoint_format,
        "gptq_quant_method": "gptq",
    }


# safetensors' dtype names (the inverse of safetensors_io.DTYPES)
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_COPY_CHUNK = 64 * 1024 * 1024


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy `count` bytes at `offset` of file `src` to the current end of file `dst`, inside the kernel where
    it can (copy_file_range), so the data never passes through this process's memory."""
    copy = getattr(os, "copy_file_range", None)
    while count > 0:
        done = 0
        if copy is not None:
            try:
                done = copy(src, dst, min(count, 1 << 30), offset)
            except OSError:  # not on this file system (or kernel): read and write in chunks
                copy = None
        if copy is None:
            data = os.pread(src, min(count, _COPY_CHUNK), offset)
            done = os.write(dst, data)
        if done <= 0:
            raise OSError(f"copying checkpoint data stopped with {count} bytes left")
        offset += done
        count -= done


def _libc_fallocate():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return fn


_FALLOCATE = _libc_fallocate()
_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _release_range(fd: int, offset: int, count: int) -> bool:
    """Give the disk blocks of a spool range that has been copied out back to the file system (Linux: punch a
    hole), so writing a sharded checkpoint needs little more disk than the checkpoint itself. Where the file
    system cannot, the spool keeps its blocks until it is removed. Returns whether the range was released."""
    return _FALLOCATE is not None and count > 0 and _FALLOCATE(fd, _PUNCH_HOLE, offset, count) == 0


def _owner_alive(partial: Path) -> bool:
    """Whether the process that made this temporary directory may still be writing it."""
    try:
        pid = int((partial / ".pid").read_text())
    except (OSError, ValueError):
        return True  # not ours to judge (an older writer's, or being created right now)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


class CheckpointWriter:
    """A GPTQ checkpoint written while its tensors are still being made, renamed into place by `finish`.

    Quantizing a large model produces its tensors block by block; `add` appends each one to a spool file in
    the temporary directory at once, so nobody holds the finished tensors in memory. `finish` writes the
    safetensors file(s) (header, then each tensor's bytes copied from the spool by the kernel:
    `copy_file_range`), the config files and the tokenizer, and renames the directory into place. Leaving the
    `with` block without `finish` (an error, Ctrl-C) removes the temporary directory: an interrupted run leaves
    nothing behind. A process killed outright (SIGKILL, out of memory) cannot clean up; its temporary
    directory records its process id, and the next writer for the same output removes it once that process is
    gone.
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise GPTQBridgeError(f"{self.out_dir}: already exists; choose a new output directory")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.out_dir.name}.partial-"
        for stale in self.out_dir.parent.glob(f"{prefix}*"):
            if stale.is_dir() and not _owner_alive(stale):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp: Path | None = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out_dir.parent))
        (self.tmp / ".pid").write_text(str(os.getpid()))
        self._spool = open(self.tmp / ".tensors.spool", "w+b")
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name -> dtype, shape, offset, bytes
        self._end = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device; written as it is, in its dtype)."""
        if name in self._entries:
            raise GPTQBridgeError(f"tensor {name!r} was written twice")
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _DTYPE_NAMES:
            raise GPTQBridgeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        data = t.reshape(-1).view(torch.uint8).numpy()
        self._spool.write(memoryview(data))
        self._entries[name] = (_DTYPE_NAMES[t.dtype], tuple(t.shape), self._end, data.nbytes)
        self._end += data.nbytes

    def _shards(self, max_shard_bytes: int | None) -> list[list[str]]:
        """Tensor names per file, in the order they were added (a new file when the next would overflow)."""
        shards: list[list[str]] = [[]]
        size = 0
        for name, (_, _, _, nbytes) in self._entries.items():
            if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        return shards

    def _write_safetensors(self, path: Path, names: list[str], metadata: dict[str, str]) -> int:
        """One safetensors file of the spooled tensors `names`; returns the bytes of tensor data."""
        # largest elements first (then by name), as the safetensors library lays files out: with the header
        # padded to 8 bytes, every tensor then starts at a multiple of its element size
        order = sorted(names, key=lambda n: (-DTYPES[self._entries[n][0]].itemsize, n))
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for n in order:
            dtype, shape, _, nbytes = self._entries[n]
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._spool.flush()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.flush()
            for n in order:
                _, _, start, nbytes = self._entries[n]
                _copy_range(self._spool.fileno(), f.fileno(), start, nbytes)
            for n in order:  # copied (or shared copy-on-write): the spool's blocks are not needed any more
                _, _, start, nbytes = self._entries[n]
                _release_range(self._spool.fileno(), start, nbytes)
        return offset

    def finish(
        self,
        hf_config: Any,
        config: QuantizeConfig,
        *,
        tokenizer: Any | None = None,
        config_location: str = "both",
        max_shard_bytes: int | None = None,
        extra_files: dict[str, str | bytes] | None = None,
    ) -> Path:
        """Write config.json, quantize_config.json and the weights (one file, or shards with an index), then
        rename the directory into place.

        `config_location`: "quantize_config" (AutoGPTQ), "config" (transformers' quantization_config block)
        or "both" (what AutoGPTQ and GPTQModel write today).
        """
        if self.tmp is None:
            raise GPTQBridgeError(f"{self.out_dir}: this writer has already finished or was aborted")
        tmp = self.tmp
        try:
            settings = config.to_json_dict()
            config_dict = hf_config.to_dict()
            config_dict.pop("quantization_config", None)
            if config_location in ("config", "both"):
                config_dict["quantization_config"] = settings
            (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
            if config_location in ("quantize_config", "both"):
                (tmp / "quantize_config.json").write_text(json.dumps(settings, indent=2) + "\n")

            base = config.model_file_base_name or "model"
            meta = safetensors_metadata(config)
            shards = self._shards(max_shard_bytes)
            if len(shards) == 1:
                self._write_safetensors(tmp / f"{base}.safetensors", shards[0], meta)
            else:
                weight_map, total = {}, 0
                for i, names in enumerate(shards, 1):
                    name = f"{base}-{i:05d}-of-{len(shards):05d}.safetensors"
                    total += self._write_safetensors(tmp / name, names, meta)
                    weight_map.update(dict.fromkeys(names, name))
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            self._spool.close()
            os.remove(tmp / ".tensors.spool")
            os.remove(tmp / ".pid")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            for name, content in (extra_files or {}).items():
                mode = "wb" if isinstance(content, bytes) else "w"
                with open(tmp / name, mode) as f:
                    f.write(content)
            os.replace(tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self.tmp = None
        return self.out_dir

    def abort(self) -> None:
        """Remove the temporary directory (nothing was renamed into place); a no-op after `finish`."""
        self._spool.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def write_checkpoint(
    out_dir: str | Path,
    hf_config: Any,
    tensors: dict[str, torch.Tensor],
    config: QuantizeConfig,
    *,
    tokenizer: Any | None = None,
    config_location: str = "both",
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write a whole checkpoint from tensors in memory (see `CheckpointWriter` for one written as it is made)."""
    with CheckpointWriter(out_dir) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.finish(
            hf_config,
            config,
            tokenizer=tokenizer,
            config_location=config_location,
            max_shard_bytes=max_shard_bytes,
            extra_files=extra_files,
        )
