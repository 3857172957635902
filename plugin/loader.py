"""The built-in loader: a GPTQ checkpoint directory to a transformers model with quantized Linears.

1. read the settings (config.py) and the architecture (config.json, through transformers);
2. build the model skeleton on the meta device: nothing full-size is allocated;
3. find the quantized Linears (those with a `.qweight` tensor), select a kernel (selection.py) and swap
   each Linear for the kernel's module, also on meta;
4. stream the tensors file by file, checking each name, shape and dtype, straight to the target device;
5. tie embeddings, check nothing was left unloaded; on CUDA, fuse q/k/v and gate/up (fusion.py);
   let each kernel module `prepare()` its layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import WeightFiles, find_weight_files, iter_tensors, read_metadata, tensor_names
from .config import ConfigFile, QuantizeConfig, read_quantize_config
from .errors import CheckpointError
from .fusion import fuse_projections
from .hookspecs import hookimpl
from .kernels.base import GPTQLinear
from .loaded_model import LoadedModel
from .plugins import registered_kernels
from .selection import select_kernel
from .skeleton import IGNORED_SUFFIXES, build_skeleton, load_hf_config, materialize_buffers
from .types import KernelChoice, KernelSpec, LayerShape, LoadOptions, ResolvedSource


@hookimpl(trylast=True)
def gptq_load_model(source: ResolvedSource, options: LoadOptions) -> LoadedModel:
    return load_checkpoint(source, options)


def quantized_layers(model: nn.Module, names: dict[str, Path]) -> list[LayerShape]:
    """The Linears that the checkpoint stores quantized (those with a `.qweight` tensor)."""
    layers = []
    for key, path in names.items():
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise CheckpointError(
                f"{path}: tensor {key!r} has no matching Linear layer in the {type(model).__name__} model"
            )
        layers.append(
            LayerShape(
                name=prefix,
                in_features=module.in_features,
                out_features=module.out_features,
                bias=module.bias is not None,
            )
        )
    if not layers:
        files = ", ".join(sorted({p.name for p in names.values()}))
        raise CheckpointError(f"{files}: no quantized layers (no '.qweight' tensors); is this a GPTQ checkpoint?")
    return layers


def check_metadata(weights: WeightFiles, config_file: ConfigFile) -> None:
    """AutoGPTQ writes the settings into each safetensors header too; they must agree with the config."""
    if weights.pickle:
        return
    config = config_file.config
    for path in weights.files:
        meta = read_metadata(path)
        for key, expected in (("gptq_bits", config.bits), ("gptq_group_size", config.group_size)):
            if key in meta and meta[key].strip().lstrip("-").isdigit() and int(meta[key]) != expected:
                raise CheckpointError(
                    f"{path}: header metadata says {key}={meta[key]}, but {config_file.label} says "
                    f"{key.removeprefix('gptq_')}={expected}"
                )


def _shape_hint(attr: str, got: tuple[int, ...], module: GPTQLinear) -> str:
    if attr == "qweight" and len(got) == 2 and got[1] == module.out_features:
        for bits in (2, 3, 4, 8):
            if bits != module.bits and got[0] == module.in_features * bits // 32:
                return f"; its shape fits {bits}-bit weights, the config says {module.bits}-bit"
    if attr in ("qzeros", "scales") and len(got) == 2 and got[0] != module.scales.shape[0]:
        return f"; {got[0]} groups stored, {module.scales.shape[0]} expected for group_size {module.group_size}"
    return ""


def _place(model: nn.Module, key: str, tensor: torch.Tensor, path: Path, options: LoadOptions) -> None:
    """Put one checkpoint tensor into the model, after checking it fits."""
    prefix, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        module = None
    current = (
        None
        if module is None
        else (module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr))
    )
    if module is None or (attr not in module._parameters and attr not in module._buffers):
        raise CheckpointError(f"{path}: tensor {key!r} does not belong to the {type(model).__name__} model")
    if current is None:
        raise CheckpointError(f"{path}: tensor {key!r} is stored, but that layer has no {attr} in this architecture")
    if tuple(tensor.shape) != tuple(current.shape):
        hint = _shape_hint(attr, tuple(tensor.shape), module) if isinstance(module, GPTQLinear) else ""
        raise CheckpointError(
            f"{path}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(current.shape)}{hint}"
        )
    if current.dtype.is_floating_point:
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {key!r} is {tensor.dtype}, expected a floating-point tensor")
    elif tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise CheckpointError(f"{path}: tensor {key!r} is {tensor.dtype}, expected an integer tensor ({current.dtype})")
    if attr == "g_idx" and isinstance(module, GPTQLinear) and tensor.numel():
        groups = module.scales.shape[0]
        if int(tensor.min()) < 0 or int(tensor.max()) >= groups:
            raise CheckpointError(
                f"{path}: tensor {key!r} names groups {int(tensor.min())}..{int(tensor.max())}, "
                f"but the layer has {groups} groups (0..{groups - 1})"
            )
    value = tensor.to(device=options.device.torch_device, dtype=current.dtype)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _unloaded(model: nn.Module) -> list[str]:
    missing = []
    for name, module in model.named_modules():
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and t.is_meta:
                missing.append(f"{name}.{attr}" if name else attr)
    return missing


@dataclass
class LoadPlan:
    """Everything decided before a single weight is read: settings, files, skeleton, layers, kernel."""

    config_file: ConfigFile
    hf_config: object
    weights: WeightFiles
    model: nn.Module  # parameters still on the meta device
    layers: list[LayerShape]
    choice: KernelChoice
    kernel: KernelSpec  # the chosen one

    @property
    def config(self) -> QuantizeConfig:
        return self.config_file.config


def plan_load(source: ResolvedSource, options: LoadOptions) -> LoadPlan:
    """Steps 1-3: cheap (headers only), so `explain` uses it too."""
    model_dir = source.path
    config_file = read_quantize_config(model_dir)
    hf_config = load_hf_config(model_dir, options.trust_remote_code)
    weights = find_weight_files(model_dir, config_file.config, options.allow_pickle)
    check_metadata(weights, config_file)
    names = tensor_names(weights)
    model = build_skeleton(hf_config, options.dtype, options.trust_remote_code)
    layers = quantized_layers(model, names)
    kernels = registered_kernels()
    choice = select_kernel(config_file.config, layers, options.device, options.dtype, kernels, options.kernel)
    chosen = next(k for k in kernels if k.name == choice.chosen)
    return LoadPlan(config_file, hf_config, weights, model, layers, choice, chosen)


def load_checkpoint(source: ResolvedSource, options: LoadOptions) -> LoadedModel:
    plan = plan_load(source, options)
    model, config = plan.model, plan.config
    with torch.device("meta"):
        for layer in plan.layers:
            parent_name, _, child = layer.name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, plan.kernel.factory(layer, config, options.dtype))

    files, current = plan.weights.files, None
    for key, tensor, path in iter_tensors(plan.weights):
        if options.progress and path != current:
            current = path
            options.progress(
                f"reading {path.name} ({files.index(path) + 1}/{len(files)}, {path.stat().st_size / 1e9:.2f} GB)"
            )
        if not key.endswith(IGNORED_SUFFIXES):
            _place(model, key, tensor, path, options)

    if getattr(plan.hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.fill_missing()
    materialize_buffers(model, options.device.torch_device)
    missing = _unloaded(model)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        files = ", ".join(p.name for p in plan.weights.files)
        raise CheckpointError(f"{files}: missing tensors {shown}")

    if options.device.type == "cuda" and options.engine != "off":
        fuse_projections(model, plan.kernel, config, options.dtype)
    model.to(options.device.torch_device)
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.prepare()
    model.eval()
    tokenizer = load_tokenizer(source.path, options.trust_remote_code) if options.load_tokenizer else None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config_file=plan.config_file,
        choice=plan.choice,
        source=source,
        device=options.device,
        dtype=options.dtype,
        weight_files=[str(p) for p in plan.weights.files],
        engine=options.engine,
        kv_cache=options.kv_cache,
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(model_dir: Path, trust_remote_code: bool):
    """The checkpoint's tokenizer, or None when it ships none."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many kinds; all mean "this tokenizer cannot be used"
        raise CheckpointError(
            f"{model_dir}: the tokenizer files cannot be loaded: {str(exc).splitlines()[0]}"
        ) from None
