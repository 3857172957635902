"""The built-in loader: a GPTQ checkpoint directory to a transformers model with quantized Linears.

1. read the settings (config.py) and the architecture (config.json, through transformers);
2. build the model skeleton on the meta device: nothing full-size is allocated;
3. find the quantized Linears (those with a `.qweight` tensor), select a kernel (selection.py) and swap
   each Linear for the kernel's module, also on meta;
4. stream the tensors file by file, checking each name, shape and dtype, straight to the target device;
5. tie embeddings, check nothing was left unloaded; for the engine, fuse q/k/v and gate/up (fusion.py) and, on
   a GPU, put act-order rows in group order where that spares a gather (act_order.py);
   let each kernel module `prepare()` its layout; on the CPU, quantize a float output head (head.py).

A split across devices (gpu_split, max_memory, device_map="auto") is planned in step 3 as well: a kernel is
selected for each device, every part's size is found on the meta device (split.py), placement.py decides
where each decoder layer goes, and step 4 streams each tensor straight to its own device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .act_order import spare_gathers
from .checkpoint import WeightFiles, find_weight_files, iter_tensors, read_metadata, tensor_names
from .config import ConfigFile, QuantizeConfig, read_quantize_config
from .errors import CheckpointError, KernelError
from .fusion import fuse_projections
from .head import compact_head, measured_head
from .hookspecs import hookimpl
from .kernels.base import GPTQLinear
from .loaded_model import LoadedModel
from .placement import Budget, ModelSizes, Placement, PlacementError, plan_placement
from .plugins import registered_kernels
from .selection import select_kernel
from .skeleton import IGNORED_SUFFIXES, build_skeleton, load_hf_config, materialize_buffers
from .types import DeviceInfo, KernelChoice, KernelSpec, LayerShape, LoadOptions, ResolvedSource


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


def _place(model: nn.Module, key: str, tensor: torch.Tensor, path: Path, device: torch.device) -> None:
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
    value = tensor.to(device=device, dtype=current.dtype)
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
    # a split across devices: where each part goes, every module's device, and the kernel on each device
    placement: Placement | None = None
    module_devices: dict[str, str] | None = None
    kernels: dict[str, KernelSpec] | None = None
    choices: dict[str, KernelChoice] | None = None
    kv_tokens: int | None = None  # the KV cache the split reserves beside each layer
    sizes: dict[str, ModelSizes] | None = None  # what each part costs on each device of the split

    @property
    def config(self) -> QuantizeConfig:
        return self.config_file.config

    def device_of(self, module_name: str, default: torch.device) -> torch.device:
        if self.module_devices is None:
            return default
        return torch.device(self.module_devices[module_name])

    def kernel_for(self, module_name: str) -> KernelSpec:
        if self.module_devices is None or self.kernels is None:
            return self.kernel
        return self.kernels[self.module_devices[module_name]]


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
    plan = LoadPlan(config_file, hf_config, weights, model, layers, choice, chosen)
    if options.split_requested:
        plan_split(plan, options, kernels)
    return plan


# --- a split across devices --------------------------------------------------------------------------------------

DEFAULT_SPLIT_KV_TOKENS = 8192  # a split reserves one context of KV cache, at most this many tokens, unless told


def auto_budgets() -> list[Budget]:
    """device_map="auto": what is free on each GPU now, less a reserve for activations and CUDA graphs, then
    most of the host memory available."""
    from .kernels.torch_ref import available_memory_bytes

    budgets = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            keep = max(2**30, total // 20)
            if free > keep:
                budgets.append(Budget(f"cuda:{i}", free - keep))
    host = available_memory_bytes()
    budgets.append(Budget("cpu", int(host * 0.8) if host else 2**40))
    return budgets


def kv_cache_shape(hf_config, dtype: torch.dtype):
    """The engine's CacheShape from a config alone (the KV heads and head width of every layer)."""
    from .engine.kv_cache import CacheShape

    heads = getattr(hf_config, "num_attention_heads", 1) or 1
    return CacheShape(
        layers=getattr(hf_config, "num_hidden_layers", 1) or 1,
        kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or getattr(hf_config, "hidden_size", 0) // heads,
        dtype=dtype,
    )


def kv_bytes_per_token_per_layer(hf_config, dtype: torch.dtype) -> int:
    shape = kv_cache_shape(hf_config, dtype)
    return shape.bytes_per_token // shape.layers


def split_kv_tokens(options: LoadOptions, hf_config) -> int:
    """The KV cache a split reserves: the kv_cache option, else one context (at most DEFAULT_SPLIT_KV_TOKENS)."""
    from .engine.kv_cache import BLOCK_SIZE, budget_tokens

    if options.kv_cache is not None:
        return budget_tokens(options.kv_cache, kv_cache_shape(hf_config, options.dtype))
    context = getattr(hf_config, "max_position_embeddings", None) or 4096
    return max(min(context, DEFAULT_SPLIT_KV_TOKENS), BLOCK_SIZE)


def _select_on(device: str, plan: LoadPlan, options: LoadOptions, kernels: list[KernelSpec]) -> KernelChoice:
    """The kernel for one device of a split: the one asked for where it can run, else the best there."""
    info = DeviceInfo.parse(device)
    try:
        return select_kernel(plan.config, plan.layers, info, options.dtype, kernels, options.kernel)
    except KernelError:
        if options.kernel == "auto" or info.type == options.device.type:
            raise
        return select_kernel(plan.config, plan.layers, info, options.dtype, kernels, "auto")


def plan_split(plan: LoadPlan, options: LoadOptions, kernels: list[KernelSpec]) -> None:
    """Decide where every part of the model goes (fills the plan's split fields)."""
    from .split import model_parts, module_devices, part_sizes

    budgets = options.budgets if options.budgets is not None else auto_budgets()
    try:
        parts = model_parts(plan.model)
    except ValueError as exc:
        raise PlacementError(f"{plan.config_file.path.parent}: {exc}") from None
    tokens = split_kv_tokens(options, plan.hf_config)
    from .engine.kv_cache import BLOCK_SIZE

    reserved = (-(-tokens // BLOCK_SIZE) + 1) * BLOCK_SIZE  # the engine's pool: whole blocks and the padding one
    kv_per_layer = reserved * kv_bytes_per_token_per_layer(plan.hf_config, options.dtype)
    tied = bool(getattr(plan.hf_config, "tie_word_embeddings", False))
    quantized = {layer.name: layer for layer in plan.layers}
    choices: dict[str, KernelChoice] = {}
    specs: dict[str, KernelSpec] = {}
    sizes = {}
    for device in dict.fromkeys(b.device for b in budgets):
        choices[device] = _select_on(device, plan, options, kernels)
        specs[device] = next(k for k in kernels if k.name == choices[device].chosen)
        per_shape: dict[tuple, int] = {}

        def quantized_bytes(name: str, spec: KernelSpec = specs[device], cache: dict = per_shape) -> int:
            layer = quantized.get(name)
            if layer is None:
                return 0
            key = (layer.in_features, layer.out_features, layer.bias)
            if key not in cache:
                with torch.device("meta"):
                    cache[key] = prepared_bytes(spec.factory(layer, plan.config, options.dtype))
            return cache[key]

        sizes[device] = part_sizes(plan.model, parts, quantized_bytes, options.dtype, kv_per_layer, tied)
    placement = plan_placement(sizes, budgets)
    plan.placement = placement
    plan.kernels = specs
    plan.choices = choices
    plan.kv_tokens = tokens
    plan.sizes = sizes
    plan.module_devices = module_devices(plan.model, parts, placement)
    first = placement.slots[0].device
    plan.choice, plan.kernel = choices[first], specs[first]


def prepared_bytes(module) -> int:
    """Bytes a quantized layer holds once its kernel has prepared it, found by preparing it on the meta device
    (shapes only, no data); a kernel whose preparation needs real data is counted as loaded."""
    fill = getattr(module, "fill_missing", None)
    try:
        if fill is not None:
            fill()
        module.prepare()
    except Exception:  # data-dependent preparation: the loaded tensors are the best estimate left
        pass
    tensors = {id(t): t for t in list(module.buffers()) + list(module.parameters())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def load_checkpoint(source: ResolvedSource, options: LoadOptions) -> LoadedModel:
    plan = plan_load(source, options)
    model, config = plan.model, plan.config
    default = options.device.torch_device
    with torch.device("meta"):
        for layer in plan.layers:
            parent_name, _, child = layer.name.rpartition(".")
            kernel = plan.kernel_for(layer.name)
            setattr(model.get_submodule(parent_name), child, kernel.factory(layer, config, options.dtype))

    files, current = plan.weights.files, None
    for key, tensor, path in iter_tensors(plan.weights):
        if options.progress and path != current:
            current = path
            options.progress(
                f"reading {path.name} ({files.index(path) + 1}/{len(files)}, {path.stat().st_size / 1e9:.2f} GB)"
            )
        if not key.endswith(IGNORED_SUFFIXES):
            _place(model, key, tensor, path, plan.device_of(key.rpartition(".")[0], default))

    if getattr(plan.hf_config, "tie_word_embeddings", False):
        model.tie_weights()
        if plan.placement is not None:
            _untie_across_devices(model, plan)
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.fill_missing()
    materialize_buffers(model, lambda name: plan.device_of(name, default))
    missing = _unloaded(model)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        files = ", ".join(p.name for p in plan.weights.files)
        raise CheckpointError(f"{files}: missing tensors {shown}")

    if plan.placement is None:
        if options.engine != "off":
            fuse_projections(model, plan.kernel, config, options.dtype)
            if default.type == "cuda":
                spare_gathers(model)
        model.to(default)
    elif options.engine != "off":
        _fuse_split(model, plan, options)
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            where = module.qweight.device
            with torch.cuda.device(where) if where.type == "cuda" else contextlib.nullcontext():
                module.prepare()  # a kernel may launch on the current device: make it the layer's
    head = compact_head(model, options.head, options.device.torch_device, measured_head(source.path))
    model.eval()
    if plan.placement is not None:
        from .split import attach_moves, model_parts

        attach_moves(model, model_parts(model), plan.module_devices)
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
        kv_cache=plan.kv_tokens if plan.placement is not None and plan.placement.split else options.kv_cache,
        placement=plan.placement,
        kernels={d: c.chosen for d, c in plan.choices.items()} if plan.choices else None,
        head=head,
    )


def _untie_across_devices(model: nn.Module, plan: LoadPlan) -> None:
    """A tied head on another device than its embeddings gets its own copy there."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return
    from .split import model_parts

    parts = model_parts(model)
    device = plan.device_of(parts.head, embed.weight.device)
    if device != embed.weight.device:
        head.weight = nn.Parameter(embed.weight.detach().to(device), requires_grad=False)


def _fuse_split(model: nn.Module, plan: LoadPlan, options: LoadOptions) -> None:
    """Fusion (fusion.py) for the decoder layers placed on a GPU, with that GPU's kernel, and their inputs' orders
    (act_order.py)."""
    from .split import model_parts

    parts = model_parts(model)
    for i in range(parts.count):
        name = f"{parts.layers}.{i}"
        device = plan.device_of(name, options.device.torch_device)
        if device.type == "cuda":
            fuse_projections(model, plan.kernel_for(name), plan.config, options.dtype, blocks=[i])
            spare_gathers(model, blocks=[i])


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
