"""A model split across devices: which module goes where, what each part costs, and the moves at split points.

`placement.py` decides from sizes and budgets alone; this module ties that to a transformers model:
- `model_parts`: the input embeddings, the decoder layers, the head, found in any causal LM;
- `part_sizes`: each part's bytes on a device once its kernel has prepared it (shapes only: on the meta device);
- `module_devices`: the device of every module name (what the loader streams each tensor to);
- `attach_moves`: hooks that move a module's inputs to its device, so transformers' forward runs split.
  The decode engine moves its hidden states itself (engine/forward.py) and needs no hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .placement import ModelSizes, Placement


@dataclass(frozen=True)
class ModelParts:
    embed: str  # module name of the input embeddings
    layers: str  # module name of the ModuleList of decoder layers
    count: int
    head: str | None  # module name of the output head


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def model_parts(model: nn.Module) -> ModelParts:
    """The decoder layers are the ModuleList with config.num_hidden_layers entries (else the largest one)."""
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found; it cannot be split")
    exact = [(n, m) for n, m in lists if len(m) == want]
    name, layers = max(exact or lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    embed = _name_of(model, model.get_input_embeddings())
    if embed is None:
        raise ValueError(f"{type(model).__name__}: no input embeddings found; it cannot be split")
    return ModelParts(embed=embed, layers=name, count=len(layers), head=_name_of(model, model.get_output_embeddings()))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_index(parts: ModelParts, name: str) -> int | None:
    """The decoder layer a module name belongs to (None: outside the layers)."""
    if not name.startswith(parts.layers + "."):
        return None
    return int(name[len(parts.layers) + 1 :].split(".", 1)[0])


def module_devices(model: nn.Module, parts: ModelParts, placement: Placement) -> dict[str, str]:
    """Every module's device: a decoder layer's with its layer; the embeddings, and modules holding no
    parameters (rotary tables), on the first device; other modules after the layers (the final norm) with
    the head; before them, with the embeddings."""
    out: dict[str, str] = {}
    after = False
    for name, module in model.named_modules():
        i = layer_index(parts, name)
        if i is not None:
            out[name] = placement.layer_device(i)
            after = True
        elif parts.head is not None and _within(name, parts.head):
            out[name] = placement.head_device
        elif _within(name, parts.embed) or not after or not any(True for _ in module.parameters(recurse=False)):
            out[name] = placement.embed_device
        else:
            out[name] = placement.head_device
    return out


def part_sizes(
    model: nn.Module,
    parts: ModelParts,
    quantized_bytes: Callable[[str], int],
    dtype: torch.dtype,
    kv_per_layer: int,
    tied: bool,
) -> ModelSizes:
    """Bytes of each part: `quantized_bytes(name)` for a quantized Linear (its kernel's prepared size, 0 for
    other modules), plain parameters in `dtype`."""
    layers = [0] * parts.count
    embed = head = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        size = quantized_bytes(name)
        if not size:
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    size += p.numel() * dtype.itemsize
        i = layer_index(parts, name)
        if i is not None:
            layers[i] += size
        elif _within(name, parts.embed):
            embed += size
        else:
            head += size  # the head, the final norm, and anything else outside the layers
    if tied and parts.head is not None:
        head += model.get_input_embeddings().weight.numel() * dtype.itemsize  # a copy where it sits apart
    return ModelSizes(embed=embed, layers=tuple(layers), head=head, kv_per_layer=kv_per_layer, tied=tied)


# --- moving inputs at the split points (transformers' forward) --------------------------------------------------


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value  # caches and other objects stay as they are (a cache keeps each layer's tensors on its device)


def attach_moves(model: nn.Module, parts: ModelParts, devices: dict[str, str]) -> list:
    """A forward pre-hook on each decoder layer and on each module outside them that sits whole on one device,
    moving its tensor arguments to that device. Returns the hook handles."""
    handles = []
    layers = model.get_submodule(parts.layers)

    def hook_for(device: torch.device):
        def hook(module, args, kwargs):
            if device.type == "cuda":  # kernels launch on the current device
                torch.cuda.set_device(device)
            return _move(args, device), _move(kwargs, device)

        return hook

    if any(d.startswith("cuda") for d in devices.values()):  # the caller's current device, restored after
        saved: list[int] = []

        def save(module, args):
            saved.append(torch.cuda.current_device())

        def restore(module, args, output):
            torch.cuda.set_device(saved.pop())

        handles += [model.register_forward_pre_hook(save), model.register_forward_hook(restore)]

    def visit(name: str, module: nn.Module) -> None:
        if module is layers:
            for i, layer in enumerate(layers):
                dev = torch.device(devices[f"{parts.layers}.{i}"])
                handles.append(layer.register_forward_pre_hook(hook_for(dev), with_kwargs=True))
            return
        names = (n if not name else f"{name}.{n}" if n else name for n, _ in module.named_modules())
        # modules made after placing (fusion.py's qkv_proj, gate_up_proj) sit inside a placed layer: skipped
        inside = {devices[n] for n in names if n in devices}
        holds_layers = _within(parts.layers, name) if name else True
        if len(inside) == 1 and not holds_layers:
            if name:  # never the whole model: its caller's inputs stay where they are
                dev = torch.device(inside.pop())
                handles.append(module.register_forward_pre_hook(hook_for(dev), with_kwargs=True))
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return handles
