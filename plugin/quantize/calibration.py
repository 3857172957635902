"""Calibration data: token windows cut from text, and the states the model hands its first decoder block."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import CalibrationError
from .forward import StopForward


def calibration_windows(
    tokenizer, *, files: Sequence[str | Path] = (), texts: Sequence[str] = (), nsamples: int = 128, seq_len: int = 2048
) -> torch.Tensor:
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
    return torch.stack([t[k * stride : k * stride + seq_len] for k in range(nsamples)])


@torch.no_grad()
def capture_block_inputs(
    model,
    blocks: nn.ModuleList,
    parent: nn.Module,
    attr: str,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
):
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
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        setattr(parent, attr, nn.ModuleList())
        model.to(device="cpu", dtype=home_dtype)
        setattr(parent, attr, blocks)
    return states, kwargs_list
