"""Where a quantization run reads its model from: a GGUF file or a transformers directory, whole or by blocks.

A transformers directory in safetensors whose tensor names are exactly the model's is built on the meta
device with only the tensors outside the decoder blocks read (`load_model_by_blocks`); each block is read
when the pipeline reaches it (`BlockWeights.fill`) and dropped once it is written. Anything else (a GGUF,
dequantized to float32 by transformers; pickle files; architectures whose loading renames or fuses tensors)
is loaded whole in its own dtype (`load_whole_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import find_weight_files, tensor_names
from ..config import QuantizeConfig
from ..errors import CheckpointError, ConfigError, QuantizeError
from ..skeleton import IGNORED_SUFFIXES, build_skeleton, load_hf_config, materialize_buffers

# Files copied verbatim from a source directory (the tokenizer is also saved through transformers).
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class Source:
    """Where the weights come from: a GGUF file, or a transformers model directory."""

    text: str
    path: Path  # the .gguf file, or the model directory
    gguf: bool

    @property
    def directory(self) -> Path | None:
        return None if self.gguf else self.path


def open_source(source: str | Path, *, revision: str | None = None) -> Source:
    """Check the source without loading weights: a GGUF file, a model directory, or a hub id."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise QuantizeError(
                f"{source}: a file source must be a GGUF file (.gguf); otherwise give a model directory or a hub id"
            )
        for module, why in (("gguf", "reading GGUF files"), ("accelerate", "loading GGUF files in transformers")):
            try:
                __import__(module)
            except ImportError:
                raise QuantizeError(
                    f"{source}: the '{module}' package is needed for {why}; pip install {module}"
                ) from None
        return Source(text=str(source), path=path, gguf=True)

    from ..plugins import resolve

    model_dir = resolve(str(source), revision=revision).path
    for name in ("quantize_config.json", "quant_config.json"):
        if (model_dir / name).is_file():
            raise QuantizeError(
                f"{model_dir / name}: the source is already a GPTQ checkpoint; quantize from the fp16/bf16/fp32 model"
            )
    if not (model_dir / "config.json").is_file():
        raise QuantizeError(f"{model_dir}: config.json is missing; is this a transformers model directory?")
    try:
        quantized = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (ValueError, AttributeError):
        raise QuantizeError(f"{model_dir / 'config.json'}: not a valid JSON object") from None
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise QuantizeError(
            f"{model_dir / 'config.json'}: the source is already quantized (quant_method "
            f"{method!r}); quantize from the fp16/bf16/fp32 model"
        )
    return Source(text=str(source), path=model_dir, gguf=False)


def load_source_tokenizer(src: Source, trust_remote_code: bool = False):
    """The source's tokenizer (a GGUF holds one); calibration text is cut into tokens with it."""
    from transformers import AutoTokenizer

    try:
        if src.gguf:
            return AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
        return AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many kinds; all mean "no usable tokenizer"
        raise QuantizeError(
            f"{src.path}: the tokenizer cannot be loaded ({str(exc).splitlines()[0]}); calibration text needs it"
        ) from None


def load_whole_model(src: Source, trust_remote_code: bool = False) -> nn.Module:
    """The model on the host in its own dtype (a GGUF is dequantized to float32 by transformers)."""
    from transformers import AutoModelForCausalLM

    try:
        if src.gguf:
            model = AutoModelForCausalLM.from_pretrained(
                str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(src.path), dtype="auto", trust_remote_code=trust_remote_code
            )
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise QuantizeError(f"{src.path}: transformers cannot load this model: {str(exc).splitlines()[0]}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if src.gguf and quantizer is not None:  # the "gguf" marker would make the model unserializable
        quantizer.remove_quantization_config(model)
    elif getattr(model.config, "quantization_config", None):
        raise QuantizeError(
            f"{src.path / 'config.json'}: the source is already quantized "
            f"({str(model.config.quantization_config)[:60]}); quantize from the fp16/bf16/fp32 model"
        )
    return model


class BlockWeights:
    """The source's safetensors tensors, read when a part of the model needs them.

    With a transformers directory in safetensors, `quantize` builds the model on the meta device, reads the
    tensors outside the decoder blocks (embeddings, final norm, head) at once, and each block's tensors only
    when it reaches that block; the block is dropped again once it is written. So the source model is never in
    memory as a whole: one block at a time, read straight into its own buffers (`safetensors_io`).
    """

    def __init__(self, names: dict[str, Path]):
        self.names = names  # tensor name -> file
        self._files: dict[Path, Any] = {}

    def fill(self, module: nn.Module, prefix: str = "", skip: str | None = None) -> None:
        """Read every parameter and persistent buffer of `module` that is still on meta, in its dtype.

        Names not in the files are left on meta (tied weights, which the caller ties); `skip` is a prefix of
        names left alone (the blocks, while the rest of the model is read).
        """
        from ..safetensors_io import SafetensorsFile

        for mod_name, mod in module.named_modules():
            tensors = [(a, t, True) for a, t in mod._parameters.items()]
            tensors += [(a, t, False) for a, t in mod._buffers.items() if a not in mod._non_persistent_buffers_set]
            for attr, t, is_param in tensors:
                key = ".".join(part for part in (prefix, mod_name, attr) if part)
                if t is None or not t.is_meta or key not in self.names or (skip and key.startswith(skip)):
                    continue
                path = self.names[key]
                if path not in self._files:
                    self._files[path] = SafetensorsFile(path)
                f = self._files[path]
                if tuple(f.shape(key)) != tuple(t.shape):
                    raise QuantizeError(
                        f"{path}: tensor {key!r} has shape {list(f.shape(key))}, but the model "
                        f"described by config.json expects {list(t.shape)}"
                    )
                value = f.read(key).to(t.dtype)
                if is_param:
                    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
                else:
                    mod._buffers[attr] = value

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def load_model_by_blocks(src: Source, trust_remote_code: bool = False) -> tuple[nn.Module, BlockWeights] | None:
    """The model on the meta device, everything but its decoder blocks read; the blocks are read later.

    None when this cannot be done exactly as transformers would load the model: no safetensors files, no
    dtype in config.json, or tensor names that differ from the model's (an architecture whose loading
    renames or fuses tensors); `load_whole_model` then loads the whole model instead.
    """
    if src.gguf:
        return None
    try:
        hf_config = load_hf_config(src.path, trust_remote_code)
        names = tensor_names(find_weight_files(src.path, QuantizeConfig(bits=4), allow_pickle=False))
    except (CheckpointError, ConfigError):
        return None
    dtype = getattr(hf_config, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return None
    names = {k: v for k, v in names.items() if not k.endswith(IGNORED_SUFFIXES)}
    try:
        model = build_skeleton(hf_config, dtype, trust_remote_code)
    except ConfigError:
        return None
    # every tensor in the files belongs to the model, and every tensor of the model is in the files
    # (or tied to one that is)
    owners: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        owners.setdefault(id(t), []).append(name)
    if set(names) - {n for group in owners.values() for n in group}:
        return None
    if any(not any(n in names for n in group) for group in owners.values()):
        return None
    blocks_name, _ = find_blocks(model)
    weights = BlockWeights(names)
    try:
        weights.fill(model, skip=f"{blocks_name}.")
        if getattr(hf_config, "tie_word_embeddings", False):
            model.tie_weights()
        materialize_buffers(model, torch.device("cpu"))
    except BaseException:
        weights.close()
        raise
    return model, weights


def load_source(source: str | Path, *, revision: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, model directory or None for a GGUF) in one call."""
    src = open_source(source, revision=revision)
    return load_whole_model(src, trust_remote_code), load_source_tokenizer(src, trust_remote_code), src.directory


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of `num_hidden_layers` modules that hold Linears."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            if any(isinstance(m, nn.Linear) for m in module[0].modules()):
                return name, module
    raise QuantizeError(f"{type(model).__name__}: no list of decoder blocks with Linear layers was found")
