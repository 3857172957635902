"""`quantize`: make a GPTQ checkpoint, in AutoGPTQ's on-disk format, from an fp16/bf16/fp32 model or a GGUF.

The pipeline, and why it is shaped this way:

1. open the source: a transformers directory in safetensors is built on the meta device and only the tensors
   outside the decoder blocks are read (`load_model_by_blocks`); each block is read when its turn comes and
   dropped once it is written. Other sources (a GGUF, dequantized to float32 by transformers; pickle files;
   architectures whose loading renames tensors) are loaded whole in their own dtype;
2. tokenize the calibration text files and cut `nsamples` non-overlapping windows of `seq_len` tokens,
   spread evenly over the text;
3. run the model up to its first decoder block to capture that block's inputs (and the keyword arguments
   the model passes it: rotary embeddings, masks), then walk the blocks one at a time on the device, in
   float32: every Linear of a block is quantized by GPTQ (gptq.py) on the inputs produced by the
   *already-quantized* earlier layers, and the block's outputs become the next block's inputs. Between
   blocks these states are stored in the model's own dtype (float16/bfloat16 halve them; a float32 model
   keeps float32);
4. true-sequential within a block: layers that read the same input tensor (q/k/v; gate/up) form a step,
   and each step sees the outputs of the steps quantized before it. The steps are discovered by watching
   which Linears receive the same tensor, so any decoder architecture works. When the calibration set fits
   in one forward pass, each Linear is quantized inside its own forward pre-hook, so a block costs one
   forward pass; otherwise each step re-runs the block over all batches, stopping at the step's last layer;
   with fp_targets (the default), the windows also go through an unquantized copy of the block, and each
   layer is fitted to reproduce the *unquantized* model's output of that layer (`_FpFit`), so it makes up
   for the errors of the layers quantized before it instead of taking them as given;
5. each finished block's tensors go to disk at once (`writer.CheckpointWriter`: a spool file in the
   temporary output directory); the safetensors file is assembled and renamed into place at the end, and an
   interrupted run removes the temporary directory.

So host memory holds one block (in its dtype, then float32), the calibration states, and that block's
working memory (Hessians, activations); not the model, and not the output.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .config import ALLOWED_BITS, QuantizeConfig
from .errors import GPTQBridgeError
from .gptq import CrossMoment, Hessian, PreparedHessian, gptq_quantize, prepare_hessian
from .gptq_layer import pack_layer
from .hookspecs import hookimpl


class QuantizeError(GPTQBridgeError):
    """Quantization cannot start or go on: bad options, source or calibration data."""


class CalibrationError(QuantizeError):
    """The calibration data is missing, unreadable or too short."""


# The branches of TheBloke/Nous-Hermes-Llama2-70B-GPTQ (all symmetric, damp 0.1, act-order).
PRESETS: dict[str, dict[str, Any]] = {
    "main": dict(bits=4, group_size=-1, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-4bit-32g-actorder_True": dict(bits=4, group_size=32, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-4bit-64g-actorder_True": dict(bits=4, group_size=64, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-4bit-128g-actorder_True": dict(bits=4, group_size=128, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-3bit--1g-actorder_True": dict(bits=3, group_size=-1, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-3bit-128g-actorder_True": dict(bits=3, group_size=128, desc_act=True, sym=True, damp_percent=0.1),
}
# Without a preset (AutoGPTQ's BaseQuantizeConfig defaults, except group 128 which everyone passes).
DEFAULTS: dict[str, Any] = dict(bits=4, group_size=128, desc_act=False, sym=True, static_groups=False,
                                damp_percent=0.01, true_sequential=True, checkpoint_format="gptq")
# Files copied verbatim from a source directory (the tokenizer is also saved through transformers).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")


@dataclass
class Progress:
    """One progress report: `stage` is load, calibrate, block, write or done."""

    stage: str
    message: str
    block: int = 0
    blocks: int = 0
    elapsed_s: float = 0.0
    remaining_s: float | None = None


@dataclass
class LayerReport:
    name: str
    loss: float  # GPTQ's weighted squared error of this layer
    damp: float  # damping actually used (raised automatically when the Cholesky factorisation failed)
    seconds: float


@dataclass
class QuantizeResult:
    path: Path
    config: QuantizeConfig
    seconds: float
    tokens: int  # calibration tokens
    layers: list[LayerReport] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- settings


def model_file_base_name(bits: int, group_size: int) -> str:
    """AutoGPTQ's weight file stem, e.g. gptq_model-4bit-128g (gptq_model-4bit--1g without groups)."""
    return f"gptq_model-{bits}bit-{group_size}g"


def resolve_settings(preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Preset values, then explicit (non-None) overrides, on top of the defaults; validated."""
    settings = dict(DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise QuantizeError(f"preset {preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
        settings.update(PRESETS[preset])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    bits, group = settings["bits"], settings["group_size"]
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise QuantizeError(f"bits {bits!r} is not supported; choose one of {', '.join(map(str, ALLOWED_BITS))}")
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
        raise QuantizeError(f"group_size {group!r} is not valid; use -1 (one group per layer) or a positive size "
                            "such as 32, 64 or 128")
    damp = settings["damp_percent"]
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (0 < damp < 1):
        raise QuantizeError(f"damp_percent {damp!r} is not valid; use a fraction between 0 and 1, such as 0.01 or 0.1")
    if settings["checkpoint_format"] not in ("gptq", "gptq_v2"):
        raise QuantizeError(f"format {settings['checkpoint_format']!r} is not valid; use 'gptq' (v1 zero points, "
                            "what AutoGPTQ writes) or 'gptq_v2'")
    return settings


# ----------------------------------------------------------------------------------------------- source


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
            raise QuantizeError(f"{source}: a file source must be a GGUF file (.gguf); otherwise give a model "
                                "directory or a hub id")
        for module, why in (("gguf", "reading GGUF files"), ("accelerate", "loading GGUF files in transformers")):
            try:
                __import__(module)
            except ImportError:
                raise QuantizeError(f"{source}: the '{module}' package is needed for {why}; "
                                    f"pip install {module}") from None
        return Source(text=str(source), path=path, gguf=True)

    from .sources import resolve_source

    model_dir = resolve_source(str(source), revision=revision).path
    for name in ("quantize_config.json", "quant_config.json"):
        if (model_dir / name).is_file():
            raise QuantizeError(f"{model_dir / name}: the source is already a GPTQ checkpoint; quantize from the "
                                "fp16/bf16/fp32 model")
    if not (model_dir / "config.json").is_file():
        raise QuantizeError(f"{model_dir}: config.json is missing; is this a transformers model directory?")
    try:
        quantized = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (ValueError, AttributeError):
        raise QuantizeError(f"{model_dir / 'config.json'}: not a valid JSON object") from None
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise QuantizeError(f"{model_dir / 'config.json'}: the source is already quantized (quant_method "
                            f"{method!r}); quantize from the fp16/bf16/fp32 model")
    return Source(text=str(source), path=model_dir, gguf=False)


def load_tokenizer(src: Source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        if src.gguf:
            return AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
        return AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many kinds; all mean "no usable tokenizer"
        raise QuantizeError(f"{src.path}: the tokenizer cannot be loaded ({str(exc).splitlines()[0]}); "
                            "calibration text needs it") from None


def load_model(src: Source, trust_remote_code: bool = False) -> nn.Module:
    """The model on the host in its own dtype (a GGUF is dequantized to float32 by transformers)."""
    from transformers import AutoModelForCausalLM

    try:
        if src.gguf:
            model = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                         dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype="auto",
                                                         trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise QuantizeError(f"{src.path}: transformers cannot load this model: {str(exc).splitlines()[0]}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if src.gguf and quantizer is not None:  # the "gguf" marker would make the model unserializable
        quantizer.remove_quantization_config(model)
    elif getattr(model.config, "quantization_config", None):
        raise QuantizeError(f"{src.path / 'config.json'}: the source is already quantized "
                            f"({str(model.config.quantization_config)[:60]}); quantize from the fp16/bf16/fp32 model")
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
        from .safetensors_io import SafetensorsFile

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
                    raise QuantizeError(f"{path}: tensor {key!r} has shape {list(f.shape(key))}, but the model "
                                        f"described by config.json expects {list(t.shape)}")
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
    renames or fuses tensors); `load_model` then loads the whole model instead.
    """
    from .checkpoint import find_weight_files, tensor_names
    from .config import QuantizeConfig
    from .errors import CheckpointError, ConfigError
    from .loader import IGNORED_SUFFIXES, build_skeleton, load_hf_config, materialize_buffers

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
    return load_model(src, trust_remote_code), load_tokenizer(src, trust_remote_code), src.directory


# ------------------------------------------------------------------------------------------ calibration


def calibration_windows(tokenizer, *, files: Sequence[str | Path] = (), texts: Sequence[str] = (),
                        nsamples: int = 128, seq_len: int = 2048) -> torch.Tensor:
    """[nsamples, seq_len] token ids: non-overlapping windows spread evenly over the concatenated texts.

    Documents are joined with the EOS token (when the tokenizer has one), as they would be in pre-training.
    """
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise CalibrationError(f"nsamples {nsamples!r} is not valid; use a positive number of windows such as 128")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise CalibrationError(f"seq_len {seq_len!r} is not valid; use a window length in tokens such as 2048")
    documents: list[tuple[str, str]] = []
    for f in files:
        p = Path(f)
        try:
            documents.append((str(p), p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise CalibrationError(f"{p}: calibration file not found") from None
        except IsADirectoryError:
            raise CalibrationError(f"{p}: is a directory; --dataset takes text files") from None
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{p}: not UTF-8 text (byte {exc.start}); --dataset takes text files") from None
        except OSError as exc:
            raise CalibrationError(f"{p}: cannot be read ({exc.strerror})") from None
    documents += [(f"text #{i + 1}", t) for i, t in enumerate(texts)]
    if not documents:
        raise CalibrationError("no calibration data: give one or more text files (--dataset FILE, or dataset=[...])")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for _, text in documents:
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    need = nsamples * seq_len
    if len(ids) < need:
        names = ", ".join(label for label, _ in documents)
        fit = len(ids) // seq_len
        raise CalibrationError(
            f"calibration text too short: {names} give {len(ids):,} tokens, but nsamples {nsamples} x seq_len "
            f"{seq_len} needs {need:,}; add text, or lower nsamples/seq_len (at most {fit} windows of "
            f"{seq_len} tokens fit)"
        )
    stride = len(ids) // nsamples
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[k * stride:k * stride + seq_len] for k in range(nsamples)])


# ------------------------------------------------------------------------------------- model structure


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of `num_hidden_layers` modules that hold Linears."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            if any(isinstance(m, nn.Linear) for m in module[0].modules()):
                return name, module
    raise QuantizeError(f"{type(model).__name__}: no list of decoder blocks with Linear layers was found")


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (we already have what we came for)."""


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _to(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_to(v, device, dtype) for v in value]
    return value


@torch.no_grad()
def capture_block_inputs(model, blocks: nn.ModuleList, parent: nn.Module, attr: str, windows: torch.Tensor,
                         batch_size: int, device: torch.device, dtype: torch.dtype):
    """The hidden states and keyword arguments the model hands its first block, one entry per batch."""
    setattr(parent, attr, nn.ModuleList())  # keep the blocks where they are while the rest moves
    home_dtype = next(model.parameters()).dtype
    model.to(device=device, dtype=dtype)
    setattr(parent, attr, blocks)
    states, kwargs_list = [], []

    def catch(module, args, kwargs):
        states.append(args[0] if args else kwargs.pop("hidden_states"))
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
            if key in kw:
                kw[key] = None  # no KV cache: every block is re-run on the same batch
        if "use_cache" in kw:
            kw["use_cache"] = False
        kwargs_list.append(kw)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        setattr(parent, attr, nn.ModuleList())
        model.to(device="cpu", dtype=home_dtype)
        setattr(parent, attr, blocks)
    return states, kwargs_list


# -------------------------------------------------------------------------------------- one block


@dataclass
class _BlockJob:
    settings: dict[str, Any]
    clip: bool
    refit: bool
    prefix: str  # e.g. model.layers.3
    tensors: dict[str, torch.Tensor]
    reports: list[LayerReport]

    def prepare(self, hessian: Hessian, name: str) -> PreparedHessian:
        """Factor a Hessian once for all the layers that read the same input."""
        return prepare_hessian(hessian, desc_act=self.settings["desc_act"],
                               damp_percent=self.settings["damp_percent"], where=f"{self.prefix}.{name}")

    def quantize_linear(self, name: str, module: nn.Linear, hessian: PreparedHessian,
                        target: torch.Tensor | None = None) -> None:
        """GPTQ on `module`; `target` replaces the weight as what the quantized layer should reproduce."""
        t = time.perf_counter()
        s = self.settings
        fmt = s["checkpoint_format"]
        result = gptq_quantize(
            module.weight.data if target is None else target, hessian, bits=s["bits"], group_size=s["group_size"], sym=s["sym"],
            desc_act=s["desc_act"], static_groups=s["static_groups"], damp_percent=s["damp_percent"],
            clip=self.clip, refit=self.refit, min_zero=1 if (fmt == "gptq" and not s["sym"]) else 0,
            where=f"{self.prefix}.{name}",
        )
        key = f"{self.prefix}.{name}"
        for k, v in pack_layer(result.layer, s["bits"], fmt).items():
            self.tensors[f"{key}.{k}"] = v
        if module.bias is not None:
            self.tensors[f"{key}.bias"] = module.bias.detach().to(torch.float16).cpu()
        # later layers of this block must see what the checkpoint will compute
        module.weight.data = result.layer.dequantize().t().to(module.weight.device, module.weight.dtype).contiguous()
        self.reports.append(LayerReport(name=key, loss=result.loss, damp=result.damp,
                                        seconds=time.perf_counter() - t))


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _call(block: nn.Module, state: torch.Tensor, kwargs: dict):
    """The block on one batch of stored states. States are kept in the model's own dtype between blocks
    (half the memory of float32 for a float16 model); the block computes in its parameters' dtype."""
    return block(state.to(next(block.parameters()).dtype), **kwargs)


def _run(block, states, kwargs_list) -> list[torch.Tensor]:
    """The block's outputs on every batch, stored in the dtype of its inputs."""
    return [_first(_call(block, h, kw)).to(h.dtype) for h, kw in zip(states, kwargs_list)]


def _groups(calls: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Linears in call order, grouped into runs that receive the very same input tensor."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    previous = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if previous is not None and x is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = x
    return groups


def _discover_steps(block, linears, state, kwargs) -> list[list[str]]:
    """Linears in call order, grouped into steps of layers that receive the very same input tensor."""
    calls: list[tuple[str, torch.Tensor]] = []
    by_module = {m: n for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append((by_module[mod], args[0])))
               for m in linears.values()]
    try:
        _call(block, state, kwargs)
    finally:
        for h in handles:
            h.remove()
    return _groups(calls)


class _FpFit:
    """Fits the layers of one step (they read the same input) to the unquantized model's outputs.

    Standard GPTQ makes a layer reproduce its own output on the inputs X_q of the quantized path. Here the
    target is the unquantized model's output X_fp W^T: min ||X_q W'^T - X_fp W^T|| + damping towards W gives
    W'^T = W^T + (H + damp)^-1 D W^T with H = 2/n X_q^T X_q and D = 2/n X_q^T (X_fp - X_q), one [in, in]
    statistic per step summed over calibration batches; GPTQ then quantizes W' with the usual Hessian (the
    two objectives differ by a constant). (D through the layers' outputs, 2/n X_q^T X_fp W^T - H W^T, is
    cheaper where a step has fewer outputs than inputs, but its cancellation made it 5x less accurate, and
    the one SmolLM2 run with it at 4-bit g32 gave perplexity 26.18 against 25.61 this way.)
    """

    def __init__(self, linears: dict[str, nn.Linear], names: list[str]):
        self.names = list(names)
        first = linears[names[0]]
        self.moment = CrossMoment(first.in_features, first.in_features, device=first.weight.device)
        self._matrix: torch.Tensor | None = None  # D in float32, once all batches are in

    def add(self, x_q: torch.Tensor, x_fp: torch.Tensor) -> None:
        """One batch: the step's input on the quantized path and in the unquantized block."""
        self.moment.add(x_q, x_fp.to(x_q.dtype) - x_q)

    @property
    def count(self) -> int:
        return self.moment.count

    def target(self, name: str, weight: torch.Tensor, prepared: PreparedHessian) -> torch.Tensor:
        """W': the weight GPTQ should reproduce so the layer's output on X_q matches the unquantized one."""
        W = weight.to(torch.float32)
        if self._matrix is None:  # the float64 sum is scaled in place and dropped: one float64 copy, not two
            self._matrix = self.moment.matrix(consume=True).to(torch.float32)
        return W + prepared.solve(self._matrix @ W.t()).t()


def _fp_input(block: nn.Module, first: nn.Linear, state: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run the unquantized `block` on one batch up to the Linear `first`; its input."""
    got: list[torch.Tensor] = []

    def pre(module, args):
        got.append(args[0])
        raise _Stop

    handle = first.register_forward_pre_hook(pre)
    try:
        _call(block, state, kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise QuantizeError("fp_targets: the unquantized copy of the block never reached the layer "
                            "the quantized block did")
    return got[0]


@torch.no_grad()
def quantize_block(block: nn.Module, states: list[torch.Tensor], kwargs_list: list[dict], job: _BlockJob,
                   true_sequential: bool, fp_states: list[torch.Tensor] | None = None):
    """Quantize every Linear of one block in place; returns the block's outputs (the next block's inputs).

    With `fp_states` (the same calibration windows through the unquantized model; needs true_sequential),
    each layer is fitted to reproduce the unquantized model's output of that layer rather than its own output
    on the drifted inputs (`_FpFit`), and the result is (outputs, unquantized outputs).
    """
    if fp_states is not None and not true_sequential:
        raise QuantizeError("fp_targets needs true_sequential")
    linears = _linears(block)
    by_module = {m: n for n, m in linears.items()}
    done: set[str] = set()

    def hessian_of(names: Iterable[str], hessians: dict[str, Hessian]) -> None:
        for n in names:
            if n not in done:  # a Linear the forward never called: no data, quantize as if inputs were white
                h = Hessian(linears[n].in_features, device=linears[n].weight.device)
                h.sum += torch.eye(h.columns, dtype=h.sum.dtype, device=h.sum.device)
                h.count = 1
                hessians[n] = h

    if true_sequential and len(states) == 1:
        # One pass: each Linear is quantized in its own pre-hook, so everything after it sees its quantized
        # output. Layers fed the same tensor (q/k/v) share one Hessian.
        last: dict[str, Any] = {"x": None, "h": None, "fit": None}

        fp_fits: dict[str, tuple[_FpFit, torch.Tensor]] = {}  # first layer of a step -> fit, unquantized input
        if fp_states is not None:  # the unquantized block first: its steps, and what each Linear sees
            calls: list[tuple[str, torch.Tensor]] = []
            handles = [m.register_forward_pre_hook(lambda mod, args: calls.append((by_module[mod], args[0])))
                       for m in linears.values()]
            try:
                fp_outputs = _run(block, fp_states, kwargs_list)
            finally:
                for h in handles:
                    h.remove()
            first_input = dict(reversed(calls))
            fp_fits = {step[0]: (_FpFit(linears, step), first_input[step[0]]) for step in _groups(calls)}
            del calls, first_input

        def pre(module, args):
            x = args[0]
            name = by_module[module]
            if last["x"] is not x:
                h = Hessian(x.shape[-1], device=x.device)
                h.add(x)
                last["x"], last["h"], last["fit"] = x, job.prepare(h, name), None
                if name in fp_fits:
                    last["fit"], x_fp = fp_fits.pop(name)
                    last["fit"].add(x, x_fp)
            if name not in done:
                done.add(name)
                fit = last["fit"]
                target = None
                if fit is not None and name in fit.names:
                    target = fit.target(name, module.weight.data, last["h"])
                job.quantize_linear(name, module, last["h"], target)

        handles = [m.register_forward_pre_hook(pre) for m in linears.values()]
        try:
            outputs = _run(block, states, kwargs_list)
        finally:
            for h in handles:
                h.remove()
        leftover: dict[str, Hessian] = {}
        hessian_of(linears, leftover)
        if leftover:
            for n, h in leftover.items():
                job.quantize_linear(n, linears[n], job.prepare(h, n))
            outputs = _run(block, states, kwargs_list)
        return (outputs, fp_outputs) if fp_states is not None else outputs

    # Step by step, each over all batches: the statistics of a step are summed over the batches before its
    # layers are quantized. With fp_states, an unquantized copy of the block gives each batch's targets.
    fp_block = copy.deepcopy(block) if fp_states is not None else None
    fp_linears = _linears(fp_block) if fp_block is not None else {}
    if true_sequential:
        steps = _discover_steps(block, linears, states[0], kwargs_list[0])
    else:
        steps = [list(linears)]  # every layer sees the unquantized block
    for step in steps:
        hessians = {n: Hessian(linears[n].in_features, device=linears[n].weight.device) for n in step}
        fit = _FpFit(linears, step) if fp_block is not None else None
        remaining = set(step)
        shared: dict[str, Any] = {"x": None, "h": None, "fp": None}

        def collect(module, args):
            name = by_module[module]
            if name not in remaining:
                return
            x = args[0]
            if shared["x"] is x:  # same tensor as the previous layer of this step: same statistics
                hessians[name] = shared["h"]
            else:
                hessians[name].add(x)
                shared["x"], shared["h"] = x, hessians[name]
                if fit is not None:
                    fit.add(x, shared["fp"])
            remaining.discard(name)
            if not remaining and true_sequential:
                raise _Stop  # nothing after this layer matters for this step

        handles = [linears[n].register_forward_pre_hook(collect) for n in step]
        try:
            for b, (h, kw) in enumerate(zip(states, kwargs_list)):
                if fit is not None:
                    shared["fp"] = _fp_input(fp_block, fp_linears[step[0]], fp_states[b], kw)
                remaining.update(step)
                shared["x"] = None
                try:
                    _call(block, h, kw)
                except _Stop:
                    pass
        finally:
            for hd in handles:
                hd.remove()
        shared.clear()
        for n in step:
            if hessians[n].count == 0:
                continue
            done.add(n)
        missing = {n: h for n, h in hessians.items() if h.count == 0}
        hessian_of(missing, hessians)
        prepared: dict[int, PreparedHessian] = {}
        for n in step:
            h = hessians[n]
            if id(h) not in prepared:
                prepared[id(h)] = job.prepare(h, n)
            target = None
            if fit is not None and n not in missing and fit.count > 0:
                target = fit.target(n, linears[n].weight.data, prepared[id(h)])
            job.quantize_linear(n, linears[n], prepared[id(h)], target)
            done.add(n)
        del prepared, hessians
    rest: dict[str, Hessian] = {}
    hessian_of(linears, rest)  # Linears no forward pass reached
    for n, h in rest.items():
        job.quantize_linear(n, linears[n], job.prepare(h, n))
        done.add(n)
    outputs = _run(block, states, kwargs_list)
    if fp_block is None:
        return outputs
    fp_outputs = _run(fp_block, fp_states, kwargs_list)
    del fp_block
    return outputs, fp_outputs


# ------------------------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _heap_policy(reuse: bool):
    """How glibc serves the quantizer's large host allocations while it runs; restored and trimmed afterwards.

    `reuse` (CPU runs with narrow layers, `_heap_reuse_pays`): serve large allocations from the heap and keep
    freed memory. Every forward pass over the calibration set allocates and frees the same activation-sized
    tensors (tens of MB each). By default glibc gives each one back to the kernel (munmap) and maps fresh
    pages for the next, and every 4 KiB page of those is a page fault that zeroes it: for SmolLM2-135M
    (39 x 512 tokens) about 9 of 55 CPU seconds per 6 blocks were system time. With mmap off and trimming
    deferred, the memory is reused instead. The price is resident memory that is not given back during the
    run (peak RSS of the SmolLM2 benchmark: 2.2 GB -> 3.0 GB).

    Otherwise (wide layers, or a GPU run): a fixed mmap threshold at glibc's initial 128 KiB, so every
    tensor above it is mapped on its own and given back to the kernel when freed. glibc's default raises the
    threshold each time a mapped block is freed, up to 32 MiB, so after the first forward pass every tensor
    up to 32 MiB (Hessians, weight copies, activations) came from the heap, where short- and long-lived
    chunks interleave and the free space between them cannot be given back: the heap grew with every block
    while the memory in use did not (hidden 1024 / MLP 2752, 16 x 512 tokens: 163 MiB in use after every
    block, free heap memory 300 -> 550 MiB over 16 blocks, peak RSS +25 MiB per block; with the fixed
    threshold 1 -> 3 MiB free and a flat peak; docs/QUALITY.md). The cost is the page faults of those
    tensors: more system time.
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.gnu_get_libc_version  # glibc only (mallopt's parameter numbers are glibc's)
        except (OSError, AttributeError):
            libc = None
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    if reuse:
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    else:
        libc.mallopt(m_mmap_threshold, GLIBC_MMAP_THRESHOLD)  # also turns glibc's dynamic threshold off
    try:
        yield
    finally:
        # glibc's default values; the threshold stays fixed at its initial value (mallopt cannot turn the
        # dynamic adjustment back on), which only means large blocks keep being mapped on their own
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_mmap_threshold, GLIBC_MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


# glibc's initial M_MMAP_THRESHOLD: allocations above it are mapped on their own (see `_heap_policy`).
GLIBC_MMAP_THRESHOLD = 128 * 1024


# Widest Linear input for which keeping freed memory in the heap pays (see `_heap_reuse_pays`).
HEAP_REUSE_MAX_WIDTH = 4096


def _heap_reuse_pays(blocks: nn.ModuleList) -> bool:
    """Whether `_heap_policy`'s heap reuse is worth its memory for these blocks.

    It saves the page faults of activation-sized tensors allocated again in every forward pass (SmolLM2,
    widths up to 1536: ~35 s of system time per run). With wider layers the float64 [in, in] Hessians and
    their factorisations (hundreds of MB to GB, a few per block) dominate the allocations, and a heap that
    never gives memory back fragments around them: measured at MLP width 5504, 3391 MiB with it against
    2737 MiB without, and at 11008 (Llama-2-7B's block) 9310 against 6279 MiB, for the same time per block.
    """
    widths = [m.in_features for m in blocks[0].modules() if isinstance(m, nn.Linear)]
    return bool(widths) and max(widths) <= HEAP_REUSE_MAX_WIDTH


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _stderr_progress(p: Progress) -> None:
    print(f"gptq-bridge quantize: {p.message}", file=sys.stderr, flush=True)


def quantize(
    source: str | Path,
    out: str | Path,
    *,
    preset: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    desc_act: bool | None = None,
    sym: bool | None = None,
    static_groups: bool | None = None,
    damp_percent: float | None = None,
    true_sequential: bool | None = None,
    checkpoint_format: str | None = None,
    dataset: Sequence[str | Path] = (),
    texts: Sequence[str] = (),
    nsamples: int = 128,
    seq_len: int = 2048,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    clip: bool = True,
    refit: bool = True,
    fp_targets: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    model: nn.Module | None = None,
    tokenizer: Any | None = None,
    progress: bool | Callable[[Progress], None] = True,
) -> QuantizeResult:
    """Quantize `source` (model directory, hub id `org/name[:branch]`, or .gguf file) into the new directory `out`.

    Settings: a `preset` (see PRESETS) and/or the explicit ones, which win. Calibration: text `dataset`
    files and/or `texts` strings, cut into `nsamples` windows of `seq_len` tokens. `batch_size` windows go
    through a block at once (default: all of them when they total at most 32k tokens). `clip` enables the
    per-group clipping search, `refit` the least-squares scale refit. `fp_targets` (default: on whenever
    true_sequential is) fits each layer to the unquantized model's outputs of that layer instead of its own
    output on the quantized path's inputs: better models for one more forward pass per block; False gives
    plain GPTQ. An already-loaded `model` and `tokenizer`
    may be passed instead of loading `source` (then `source` is only recorded); the model is consumed: its
    decoder blocks are moved to the meta device one by one as they are written. A model directory in
    safetensors is read one block at a time (see `load_model_by_blocks`). `progress`: True prints one line per
    block to stderr, a callable receives `Progress` events (it may raise to abort; nothing is left then).
    """
    from .types import DeviceInfo

    t0 = time.perf_counter()
    report = _stderr_progress if progress is True else (progress or (lambda p: None))
    s = resolve_settings(preset, bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                         static_groups=static_groups, damp_percent=damp_percent, true_sequential=true_sequential,
                         checkpoint_format=checkpoint_format)
    if fp_targets is None:
        fp_targets = bool(s["true_sequential"])
    elif fp_targets and not s["true_sequential"]:
        raise QuantizeError("fp_targets needs true_sequential (each layer is fitted on the outputs of the "
                            "already-quantized layers before it)")
    out = Path(out).expanduser()
    if out.exists():
        raise QuantizeError(f"{out}: already exists; choose a new output directory")
    dev = DeviceInfo.parse(device).torch_device

    src = None if model is not None else open_source(source, revision=revision)
    if tokenizer is None:
        if src is None:
            raise CalibrationError("a tokenizer is needed to cut the calibration text into tokens; pass tokenizer=")
        tokenizer = load_tokenizer(src, trust_remote_code)
    # checked before the (slow) model load, so a too-short text fails at once
    windows = calibration_windows(tokenizer, files=dataset, texts=texts, nsamples=nsamples, seq_len=seq_len)
    if batch_size is None:
        batch_size = max(1, min(nsamples, 32768 // seq_len))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QuantizeError(f"batch_size {batch_size!r} is not valid; use a positive number of windows")
    weights: BlockWeights | None = None
    if model is None:
        report(Progress("load", f"loading {source}"))
        lazy = load_model_by_blocks(src, trust_remote_code)
        if lazy is not None:
            model, weights = lazy
        else:
            model = load_model(src, trust_remote_code)
        source_dir = src.directory
    else:
        source_dir = Path(str(source)) if Path(str(source)).is_dir() else None
    model.eval()
    try:
        return _quantize_loaded(model, weights, tokenizer, windows, out, s, source=source, source_dir=source_dir,
                                dev=dev, batch_size=batch_size, clip=clip, refit=refit, fp_targets=fp_targets,
                                report=report, t0=t0)
    finally:
        if weights is not None:
            weights.close()


def _quantize_loaded(model: nn.Module, weights: BlockWeights | None, tokenizer, windows: torch.Tensor, out: Path,
                     s: dict[str, Any], *, source, source_dir: Path | None, dev: torch.device, batch_size: int,
                     clip: bool, refit: bool, fp_targets: bool, report: Callable[[Progress], None],
                     t0: float) -> QuantizeResult:
    """Calibrate, quantize block by block (reading each block from `weights` when given), stream the output."""
    from .writer import CheckpointWriter

    compute = torch.float32
    nsamples, seq_len = windows.shape

    blocks_name, blocks = find_blocks(model)
    parent_name, _, attr = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    report(Progress("calibrate", f"{nsamples} windows x {seq_len} tokens, {len(blocks)} blocks, "
                                 f"{s['bits']}-bit group {s['group_size']}{' act-order' if s['desc_act'] else ''}"))
    # the calibration states between blocks are stored in the model's own dtype (computed in float32)
    store = next(p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta)
    with CheckpointWriter(out) as writer, _heap_policy(reuse=dev.type == "cpu" and _heap_reuse_pays(blocks)):
        states, kwargs_list = capture_block_inputs(model, blocks, parent, attr, windows, batch_size, dev, compute)
        states = [h.to(store) for h in states]
        reports: list[LayerReport] = []
        fp_states = list(states) if fp_targets else None
        t_blocks = time.perf_counter()
        for i, block in enumerate(blocks):
            tb = time.perf_counter()
            prefix = f"{blocks_name}.{i}"
            if weights is not None:
                weights.fill(block, prefix)
            block.to(device=dev, dtype=compute)
            tensors: dict[str, torch.Tensor] = {}
            job = _BlockJob(settings=s, clip=clip, refit=refit, prefix=prefix, tensors=tensors, reports=reports)
            if fp_states is not None:
                states, fp_states = quantize_block(block, states, kwargs_list, job, s["true_sequential"], fp_states)
            else:
                states = quantize_block(block, states, kwargs_list, job, s["true_sequential"])
            quantized = set(_linears(block))
            for key, value in block.state_dict().items():
                if key.rpartition(".")[0] not in quantized or key.endswith(".bias"):
                    if f"{prefix}.{key}" not in tensors:
                        tensors[f"{prefix}.{key}"] = value.detach().to(torch.float16).cpu()
            for key, value in tensors.items():  # to disk now: only this block's output is ever in memory
                writer.add(key, value)
            del tensors, job
            block.to(device="meta")  # the block's float weights are done with
            done = i + 1
            per_block = (time.perf_counter() - t_blocks) / done
            remaining = per_block * (len(blocks) - done)
            report(Progress("block", f"block {done}/{len(blocks)} done in {time.perf_counter() - tb:.1f}s, "
                                     f"~{_seconds(remaining)} left", block=done, blocks=len(blocks),
                            elapsed_s=time.perf_counter() - t0, remaining_s=remaining))
        del states, fp_states

        block_keys = f"{blocks_name}."
        seen: dict[tuple[int, int], str] = {}
        for key, value in model.state_dict().items():
            if key.startswith(block_keys):
                continue
            ident = (value.untyped_storage().data_ptr(), value.storage_offset())
            if ident in seen:  # tied weights (lm_head = embed_tokens): stored once, tied again at load
                continue
            seen[ident] = key
            writer.add(key, value.detach().to(torch.float16).cpu())

        config = QuantizeConfig(
            bits=s["bits"], group_size=s["group_size"], desc_act=s["desc_act"], sym=s["sym"],
            static_groups=s["static_groups"], damp_percent=s["damp_percent"], true_sequential=s["true_sequential"],
            model_name_or_path=str(out), model_file_base_name=model_file_base_name(s["bits"], s["group_size"]),
            quant_method="gptq", checkpoint_format=s["checkpoint_format"],
        )
        hf_config = copy.deepcopy(model.config)
        hf_config.dtype = torch.float16  # what the non-quantized tensors are stored as
        extra: dict[str, str | bytes] = {}
        if source_dir is not None:
            for name in COPIED_FILES:
                if (source_dir / name).is_file():
                    extra[name] = (source_dir / name).read_bytes()
        if "generation_config.json" not in extra and getattr(model, "generation_config", None) is not None:
            extra["generation_config.json"] = model.generation_config.to_json_string()
        report(Progress("write", f"writing {out}"))
        writer.finish(hf_config, config, tokenizer=tokenizer, config_location="both", extra_files=extra)
    seconds = time.perf_counter() - t0
    report(Progress("done", f"wrote {out} in {_seconds(seconds)}", elapsed_s=seconds, remaining_s=0.0))
    return QuantizeResult(path=out, config=config, seconds=seconds, tokens=int(windows.numel()), layers=reports)


# ---------------------------------------------------------------------------------------------- CLI


def _cmd_quantize(args) -> int:
    result = quantize(
        args.source, args.out, preset=args.preset, bits=args.bits, group_size=args.group_size,
        desc_act=args.desc_act, sym=args.sym, static_groups=args.static_groups, damp_percent=args.damp,
        true_sequential=args.true_sequential, checkpoint_format=args.format, dataset=args.dataset,
        nsamples=args.nsamples, seq_len=args.seq_len, device=args.device, batch_size=args.batch_size,
        clip=args.clip, refit=args.refit, fp_targets=args.fp_targets, revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    print(result.path)
    return 0


@hookimpl
def gptq_register_commands(subparsers):
    import argparse

    p = subparsers.add_parser(
        "quantize", help="make a GPTQ checkpoint (AutoGPTQ format) from an fp16/bf16/fp32 model or a GGUF file",
        description="Quantize a model with GPTQ. A --preset sets bits/group/act-order/damp as on the 70B card's "
                    "branches; explicit options override it. Presets: " + ", ".join(PRESETS),
    )
    p.add_argument("source", help="model directory, hub id org/name[:branch], or a .gguf file")
    p.add_argument("out", help="output directory (must not exist; written atomically)")
    p.add_argument("--preset", choices=list(PRESETS), default=None, metavar="NAME",
                   help="settings of one of the card's branches: " + ", ".join(PRESETS))
    p.add_argument("--bits", type=int, choices=list(ALLOWED_BITS), default=None, help="default 4")
    p.add_argument("--group-size", type=int, default=None, help="rows per group, or -1 for one group (default 128)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                   help="act-order: quantize rows by descending Hessian diagonal")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric zero points")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="fix groups before act-order (g_idx monotonic)")
    p.add_argument("--damp", type=float, default=None, help="damp_percent (default 0.01; presets 0.1)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize each layer on the outputs of the already-quantized ones (default on)")
    p.add_argument("--format", choices=["gptq", "gptq_v2"], default=None, help="zero-point format (default gptq)")
    p.add_argument("--dataset", nargs="+", required=True, metavar="FILE", help="calibration text file(s)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: up to 32k tokens)")
    p.add_argument("--no-clip", dest="clip", action="store_false", help="plain min/max ranges (no clipping search)")
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="keep GPTQ's scales (no least-squares refit of the scales after rounding)")
    p.add_argument("--fp-targets", action=argparse.BooleanOptionalAction, default=None,
                   help="fit each layer to the unquantized model's outputs (one more forward pass per block; "
                        "default on, off with --no-true-sequential); --no-fp-targets: plain GPTQ")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of the source")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the source model's own Python code")
    p.set_defaults(func=_cmd_quantize)
