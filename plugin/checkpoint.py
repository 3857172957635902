"""Weight files: which files hold the tensors, and reading them one tensor at a time.

Safetensors files are read tensor by tensor straight into each tensor's memory (safetensors_io.py), so
loading never holds a shard twice.
Pickle files (`.bin`, `.pt`) can run code when loaded: they are refused unless the caller opts in, and even
then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import BaseModel

from .config import QuantizeConfig
from .errors import CheckpointError
from .safetensors_io import SafetensorsFile


class WeightFiles(BaseModel):
    """The files holding a checkpoint's tensors, and which file holds each tensor."""

    files: list[Path]
    pickle: bool = False
    index: Path | None = None


def _candidates(model_dir: Path, config: QuantizeConfig, ext: str) -> list[Path]:
    stems = []
    if config.model_file_base_name:
        stems.append(config.model_file_base_name)
    stems += ["model", f"gptq_model-{config.bits}bit-{config.group_size}g"]
    if ext != ".safetensors":
        stems.append("pytorch_model")
    return [model_dir / f"{stem}{ext}" for stem in stems]


def _from_index(index: Path) -> WeightFiles:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object)") from None
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index}: lists shard {shard!r}, which is missing from {index.parent}")
        files.append(path)
    return WeightFiles(files=files, index=index, pickle=not index.name.endswith(".safetensors.index.json"))


def find_weight_files(model_dir: Path, config: QuantizeConfig, allow_pickle: bool = False) -> WeightFiles:
    """Locate the weights: a shard index, the configured file name, AutoGPTQ's naming, or the only file."""
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    if indexes:
        return _from_index(indexes[0])
    for path in _candidates(model_dir, config, ".safetensors"):
        if path.is_file():
            return WeightFiles(files=[path])
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return WeightFiles(files=found)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(
            f"{model_dir}: several .safetensors files ({names}) and no model.safetensors.index.json; "
            "set model_file_base_name in the quantize config to say which one to load"
        )
    pickles = sorted(model_dir.glob("*.bin.index.json")) + sorted(
        p for ext in (".bin", ".pt") for p in model_dir.glob(f"*{ext}") if "training_args" not in p.name
    )
    if not pickles:
        raise CheckpointError(f"{model_dir}: no weight files (.safetensors) found")
    if not allow_pickle:
        raise CheckpointError(
            f"{pickles[0]}: pickle weight files can run arbitrary code when loaded, so they are refused; "
            "convert the checkpoint to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust it"
        )
    if pickles[0].name.endswith(".index.json"):
        return _from_index(pickles[0])
    for ext in (".bin", ".pt"):
        for path in _candidates(model_dir, config, ext):
            if path.is_file():
                return WeightFiles(files=[path], pickle=True)
    return WeightFiles(files=[pickles[0]], pickle=True)


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata (AutoGPTQ writes gptq_bits, gptq_group_size, ... there)."""
    with SafetensorsFile(path) as f:
        return dict(f.metadata)


def tensor_names(weights: WeightFiles) -> dict[str, Path]:
    """Every tensor name and the file that holds it."""
    names: dict[str, Path] = {}
    for path in weights.files:
        if weights.pickle:
            keys = _load_pickle(path).keys()
        else:
            with SafetensorsFile(path) as f:
                keys = f.keys()
        for key in keys:
            if key in names:
                raise CheckpointError(f"{path}: tensor {key!r} is also in {names[key].name}")
            names[key] = path
    return names


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, expected a dict of tensors")
    return data


def iter_tensors(weights: WeightFiles) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) one tensor at a time, file by file."""
    for path in weights.files:
        if weights.pickle:
            yield from ((k, v, path) for k, v in _load_pickle(path).items())
            continue
        with SafetensorsFile(path) as f:
            for key in f.keys():
                yield key, f.read(key), path
