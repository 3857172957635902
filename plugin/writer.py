"""Writing GPTQ checkpoints exactly as AutoGPTQ lays them out, atomically.

Everything is written into a temporary directory beside the target and renamed into place at the end, so
an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import QuantizeConfig
from .errors import GPTQBridgeError


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


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_shard_bytes:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


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
    """Write config.json, quantize_config.json and the weights (one file, or shards with an index).

    `config_location`: "quantize_config" (AutoGPTQ), "config" (transformers' quantization_config block)
    or "both" (what AutoGPTQ and GPTQModel write today).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise GPTQBridgeError(f"{out_dir}: already exists; choose a new output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
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
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        shards = _shards(contiguous, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / f"{base}.safetensors"), metadata=meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                name = f"{base}-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                for key, t in shard.items():
                    weight_map[key] = name
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
