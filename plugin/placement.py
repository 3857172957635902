"""Where each part of a model goes when it is split across devices: a pure function over sizes and budgets.

The input is what each part costs (the input embeddings, every decoder layer, the final norm and head, the KV
cache one decoder layer keeps) and a budget for each device in fill order (GPUs first, then the CPU). The
output says which device holds what:

- the embeddings go on the first device, the head on the last one used;
- each decoder layer goes whole on one device, with its KV cache beside it;
- devices are filled in order, so hidden states cross between devices as few times as the budgets allow.

A device may be listed twice (two "cpu" budgets): each listing is its own slot, and the model is split between
them all the same. Sizes are bytes; nothing here touches torch or a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import GPTQBridgeError

GIB = 2**30


class PlacementError(GPTQBridgeError):
    """The model does not fit in the budgets it was given."""


@dataclass(frozen=True)
class ModelSizes:
    """What a model costs on one kind of device, in bytes (a CPU kernel may hold a layer differently)."""

    embed: int  # the input embeddings (and whatever else runs before the first decoder layer)
    layers: tuple[int, ...]  # each decoder layer's weights
    head: int  # the final norm and the output head
    kv_per_layer: int  # the KV cache one decoder layer keeps
    tied: bool = False  # the head is the embeddings: no extra bytes where both sit on one device


@dataclass(frozen=True)
class Budget:
    device: str  # "cuda:0", "cpu", ...
    bytes: int


@dataclass(frozen=True)
class Slot:
    """One budget's share of the model."""

    device: str
    budget: int
    layers: tuple[int, int]  # decoder layers [start, end)
    embed: bool
    head: bool
    weights_bytes: int
    kv_bytes: int

    @property
    def used(self) -> int:
        return self.weights_bytes + self.kv_bytes


@dataclass(frozen=True)
class Placement:
    slots: tuple[Slot, ...]  # the slots that hold something, in fill order
    layer_slot: tuple[int, ...] = field(repr=False)  # slot index of each decoder layer

    @property
    def devices(self) -> list[str]:
        return [s.device for s in self.slots]

    @property
    def embed_device(self) -> str:
        return next(s.device for s in self.slots if s.embed)

    @property
    def head_device(self) -> str:
        return next(s.device for s in self.slots if s.head)

    def layer_device(self, i: int) -> str:
        return self.slots[self.layer_slot[i]].device

    @property
    def split(self) -> bool:
        return len(self.slots) > 1

    def describe(self) -> list[str]:
        """One line per slot: its device, what it holds and its bytes."""
        lines = []
        for s in self.slots:
            parts = (["embeddings"] if s.embed else []) + (
                [_layer_range(*s.layers)] if s.layers[1] > s.layers[0] else []
            )
            parts += ["head"] if s.head else []
            lines.append(
                f"{s.device}: {', '.join(parts)}: weights {human(s.weights_bytes)} + KV cache {human(s.kv_bytes)}"
                f" = {human(s.used)} of {human(s.budget)}"
            )
        return lines

    def to_json(self) -> list[dict]:
        return [
            {
                "device": s.device,
                "layers": list(s.layers),
                "embeddings": s.embed,
                "head": s.head,
                "weights_bytes": s.weights_bytes,
                "kv_cache_bytes": s.kv_bytes,
                "budget_bytes": s.budget,
            }
            for s in self.slots
        ]


def human(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _layer_range(start: int, end: int) -> str:
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


def _device_type(device: str) -> str:
    return device.split(":")[0]


def plan_placement(sizes: ModelSizes | Mapping[str, ModelSizes], budgets: Sequence[Budget]) -> Placement:
    """Fill the budgets in order: embeddings on the first, whole decoder layers with their KV cache while they
    fit, the head with the last layer. `sizes` may differ per device ({"cuda:0": ..., "cpu": ...}) or device
    type ({"cuda": ..., "cpu": ...}).

    Raises PlacementError naming what does not fit, how much is missing and what each device holds."""
    if not budgets:
        raise PlacementError("no device budgets given")
    for b in budgets:
        if b.bytes <= 0:
            raise PlacementError(f"{b.device}: budget {b.bytes} bytes; a budget must be more than zero")

    def size(device: str) -> ModelSizes:
        if isinstance(sizes, ModelSizes):
            return sizes
        found = sizes.get(device) or sizes.get(_device_type(device))  # "cuda:1", else any "cuda"
        if found is None:
            raise PlacementError(f"{device}: no sizes for this device or device type {_device_type(device)!r}")
        return found

    first = size(budgets[0].device)
    n = len(first.layers)
    used = [0] * len(budgets)
    weights = [0] * len(budgets)
    kv = [0] * len(budgets)
    layer_slot: list[int] = []
    d = 0
    used[0] = weights[0] = first.embed
    if first.embed > budgets[0].bytes:
        raise PlacementError(
            f"{budgets[0].device}: the embeddings alone need {human(first.embed)}, the budget is "
            f"{human(budgets[0].bytes)}; {human(first.embed - budgets[0].bytes)} missing there"
        )
    for i in range(n + 1):  # i == n: the head (its own step, so it may move on to a device of its own)
        while True:
            s = size(budgets[d].device)
            if i < n:
                w, k = s.layers[i], s.kv_per_layer
            else:
                w, k = (0 if s.tied and d == 0 else s.head), 0
            if used[d] + w + k <= budgets[d].bytes:
                break
            if d + 1 == len(budgets):
                raise _missing(budgets, sizes, size, i, n, used, weights, kv, layer_slot)
            d += 1
        used[d] += w + k
        weights[d] += w
        kv[d] += k
        if i < n:
            layer_slot.append(d)
    head_slot = d
    kept = sorted({0, head_slot, *layer_slot})
    index = {old: new for new, old in enumerate(kept)}
    slots = []
    for old in kept:
        mine = [i for i, s in enumerate(layer_slot) if s == old]
        span = (mine[0], mine[-1] + 1) if mine else (0, 0)
        slots.append(
            Slot(
                device=budgets[old].device,
                budget=budgets[old].bytes,
                layers=span,
                embed=old == 0,
                head=old == head_slot,
                weights_bytes=weights[old],
                kv_bytes=kv[old],
            )
        )
    return Placement(slots=tuple(slots), layer_slot=tuple(index[s] for s in layer_slot))


def _missing(budgets, sizes, size, i, n, used, weights, kv, layer_slot) -> PlacementError:
    """The error when part `i` (a layer, or n: the head) fits nowhere: what is left, how much is missing."""
    last = size(budgets[-1].device)
    rest = sum(last.layers[i:]) + last.kv_per_layer * (n - i) + last.head
    free = budgets[-1].bytes - used[-1]
    what = f"{_layer_range(i, n)} and the head" if i < n else "the head"
    held = []
    for d, b in enumerate(budgets):
        mine = [j for j, s in enumerate(layer_slot) if s == d]
        parts = (["embeddings"] if d == 0 else []) + ([_layer_range(mine[0], mine[-1] + 1)] if mine else [])
        held.append(f"{b.device} holds {', '.join(parts) or 'nothing'} ({human(used[d])} of {human(b.bytes)})")
    return PlacementError(
        f"the model does not fit: {what} need {human(rest)} more (weights and KV cache), "
        f"{human(max(free, 0))} is left on {budgets[-1].device}, the last device: "
        f"{human(rest - max(free, 0))} missing on {budgets[-1].device}; "
        + "; ".join(held)
        + ". Give larger budgets, another device (e.g. the CPU), or a smaller kv_cache"
    )


# --- budgets as users write them ---------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|MiB|KiB|GB|MB|KB|B)?\s*$", re.IGNORECASE)
_UNITS = {"gib": GIB, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}


def parse_size(value: int | float | str, what: str) -> int:
    """Bytes from "20GiB", "512MiB", "24GB", or a bare number of GiB (gpu_split's unit, as in ExLlama)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise GPTQBridgeError(f"{what}: {value!r} is not a size; give GiB (20) or a size ('20GiB', '512MiB')")
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise GPTQBridgeError(f"{what}: {value!r} is not a size; give GiB (20) or a size ('20GiB', '512MiB')")
        amount = float(m.group(1)) * _UNITS[(m.group(2) or "gib").lower()]
    else:
        amount = float(value) * GIB
    if amount <= 0:
        raise GPTQBridgeError(f"{what}: {value!r} must be more than zero")
    return int(amount)


def _device_name(key: int | str, what: str) -> str:
    if isinstance(key, bool):
        raise GPTQBridgeError(f"{what}: device {key!r} is not understood; use a GPU index (0), 'cuda:N' or 'cpu'")
    if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()):
        return f"cuda:{int(key)}"
    if isinstance(key, str):
        k = key.strip().lower()
        if k == "cpu":
            return "cpu"
        if k == "cuda":
            return "cuda:0"
        m = re.fullmatch(r"cuda:(\d+)", k)
        if m:
            return f"cuda:{int(m.group(1))}"
    raise GPTQBridgeError(f"{what}: device {key!r} is not understood; use a GPU index (0), 'cuda:N' or 'cpu'")


def budgets_from(
    gpu_split: Sequence[int | float | str] | str | None = None,
    max_memory: Mapping[int | str, int | float | str]
    | Sequence[tuple[int | str, int | float | str]]
    | str
    | None = None,
) -> list[Budget] | None:
    """The budgets the user asked for, in fill order, or None when neither option is given.

    - `gpu_split`: GiB per GPU in index order ([20, 24] or "20,24"), as ExLlama's gpu_split;
    - `max_memory`: {0: "20GiB", 1: "24GiB", "cpu": "48GiB"} (GPUs in index order, then the CPU), or
      "0=20GiB,cpu=48GiB", or a list of (device, size) pairs kept in the order given, where a device may repeat.
    """
    if gpu_split is not None and max_memory is not None:
        raise GPTQBridgeError("gpu_split and max_memory both given; use one of them")
    if gpu_split is not None:
        values = gpu_split.split(",") if isinstance(gpu_split, str) else list(gpu_split)
        if not values or any(str(v).strip() == "" for v in values):
            raise GPTQBridgeError(f"gpu_split: {gpu_split!r}; give GiB per GPU in order, e.g. [20, 24] or '20,24'")
        return [Budget(f"cuda:{i}", parse_size(v, f"gpu_split[{i}]")) for i, v in enumerate(values)]
    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        pairs = []
        for part in max_memory.split(","):
            key, eq, value = part.partition("=")
            if not eq:
                raise GPTQBridgeError(f"max_memory: {part!r} is not DEVICE=SIZE; e.g. '0=20GiB,1=24GiB,cpu=48GiB'")
            pairs.append((key.strip(), value.strip()))
        ordered = False
    elif isinstance(max_memory, Mapping):
        pairs, ordered = list(max_memory.items()), False
    else:
        pairs, ordered = [tuple(p) for p in max_memory], True
        if any(len(p) != 2 for p in pairs):
            raise GPTQBridgeError(f"max_memory: {max_memory!r}; give (device, size) pairs")
    if not pairs:
        raise GPTQBridgeError("max_memory: empty; give at least one device budget")
    budgets = [Budget(_device_name(k, "max_memory"), parse_size(v, f"max_memory[{k!r}]")) for k, v in pairs]
    if not ordered:
        names = [b.device for b in budgets]
        if len(set(names)) != len(names):
            raise GPTQBridgeError(f"max_memory: a device is named twice ({', '.join(names)})")
        budgets.sort(key=lambda b: (b.device == "cpu", int(b.device.partition(":")[2] or 0)))
    return budgets
