"""The quantization pipeline: source and calibration in, a GPTQ checkpoint out, one decoder block at a time.

1. open the source (source.py): a transformers directory in safetensors is built on the meta device and only
   the tensors outside the decoder blocks are read; each block is read when its turn comes and dropped once it
   is written. Other sources are loaded whole in their own dtype;
2. tokenize the calibration text files and cut `nsamples` non-overlapping windows of `seq_len` tokens,
   spread evenly over the text (calibration.py);
3. run the model up to its first decoder block to capture that block's inputs (and the keyword arguments
   the model passes it: rotary embeddings, masks), then walk the blocks one at a time on the device, in
   float32: every Linear of a block is quantized by GPTQ on the inputs produced by the *already-quantized*
   earlier layers (block.py), and the block's outputs become the next block's inputs. Between blocks these
   states are stored in the model's own dtype (float16/bfloat16 halve them; a float32 model keeps float32);
4. each finished block's tensors go to disk at once (`writer.CheckpointWriter`: a spool file in the
   temporary output directory); the safetensors file is assembled and renamed into place at the end, and an
   interrupted run removes the temporary directory.

So host memory holds one block (in its dtype, then float32), the calibration states, and that block's
working memory (Hessians, activations); not the model, and not the output.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QuantizeConfig
from ..errors import CalibrationError, QuantizeError
from ..types import DeviceInfo
from ..writer import CheckpointWriter
from .block import BlockJob, LayerReport, linears, quantize_block
from .calibration import calibration_windows, capture_block_inputs
from .heap import heap_policy, heap_reuse_pays
from .settings import model_file_base_name, resolve_settings
from .source import (
    COPIED_FILES,
    BlockWeights,
    find_blocks,
    load_model_by_blocks,
    load_source_tokenizer,
    load_whole_model,
    open_source,
)


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
class QuantizeResult:
    path: Path
    config: QuantizeConfig
    seconds: float
    tokens: int  # calibration tokens
    layers: list[LayerReport] = field(default_factory=list)


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
    t0 = time.perf_counter()
    report = _stderr_progress if progress is True else (progress or (lambda p: None))
    s = resolve_settings(
        preset,
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        static_groups=static_groups,
        damp_percent=damp_percent,
        true_sequential=true_sequential,
        checkpoint_format=checkpoint_format,
    )
    if fp_targets is None:
        fp_targets = bool(s.true_sequential)
    elif fp_targets and not s.true_sequential:
        raise QuantizeError(
            "fp_targets needs true_sequential (each layer is fitted on the outputs of the "
            "already-quantized layers before it)"
        )
    out = Path(out).expanduser()
    if out.exists():
        raise QuantizeError(f"{out}: already exists; choose a new output directory")
    dev = DeviceInfo.parse(device).torch_device

    src = None if model is not None else open_source(source, revision=revision)
    if tokenizer is None:
        if src is None:
            raise CalibrationError("a tokenizer is needed to cut the calibration text into tokens; pass tokenizer=")
        tokenizer = load_source_tokenizer(src, trust_remote_code)
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
            model = load_whole_model(src, trust_remote_code)
        source_dir = src.directory
    else:
        source_dir = Path(str(source)) if Path(str(source)).is_dir() else None
    model.eval()
    try:
        return _quantize_loaded(
            model,
            weights,
            tokenizer,
            windows,
            out,
            s,
            source=source,
            source_dir=source_dir,
            dev=dev,
            batch_size=batch_size,
            clip=clip,
            refit=refit,
            fp_targets=fp_targets,
            report=report,
            t0=t0,
        )
    finally:
        if weights is not None:
            weights.close()


def _quantize_loaded(
    model: nn.Module,
    weights: BlockWeights | None,
    tokenizer,
    windows: torch.Tensor,
    out: Path,
    s: QuantizeConfig,
    *,
    source,
    source_dir: Path | None,
    dev: torch.device,
    batch_size: int,
    clip: bool,
    refit: bool,
    fp_targets: bool,
    report: Callable[[Progress], None],
    t0: float,
) -> QuantizeResult:
    """Calibrate, quantize block by block (reading each block from `weights` when given), stream the output."""
    compute = torch.float32
    nsamples, seq_len = windows.shape

    blocks_name, blocks = find_blocks(model)
    parent_name, _, attr = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    report(
        Progress(
            "calibrate",
            f"{nsamples} windows x {seq_len} tokens, {len(blocks)} blocks, "
            f"{s.bits}-bit group {s.group_size}{' act-order' if s.desc_act else ''}",
        )
    )
    # the calibration states between blocks are stored in the model's own dtype (computed in float32)
    store = next(p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta)
    with CheckpointWriter(out) as writer, heap_policy(reuse=dev.type == "cpu" and heap_reuse_pays(blocks)):
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
            job = BlockJob(settings=s, clip=clip, refit=refit, prefix=prefix, tensors=tensors, reports=reports)
            if fp_states is not None:
                states, fp_states = quantize_block(block, states, kwargs_list, job, s.true_sequential, fp_states)
            else:
                states = quantize_block(block, states, kwargs_list, job, s.true_sequential)
            quantized = set(linears(block))
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
            report(
                Progress(
                    "block",
                    f"block {done}/{len(blocks)} done in {time.perf_counter() - tb:.1f}s, ~{_seconds(remaining)} left",
                    block=done,
                    blocks=len(blocks),
                    elapsed_s=time.perf_counter() - t0,
                    remaining_s=remaining,
                )
            )
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

        config = s.model_copy(
            update=dict(
                model_name_or_path=str(out),
                quant_method="gptq",
                model_file_base_name=model_file_base_name(s.bits, s.group_size),
            )
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
