"""Build gptq_mma.cu (with the headers beside it) once per machine with nvcc and load it with ctypes.

The library is plain CUDA C with a C interface (raw pointers, sizes, a stream), linked against the static
CUDA runtime: it does not depend on torch's C++ ABI, so one build serves every torch version, and it builds in
seconds. Builds are cached in GPTQ_BRIDGE_KERNEL_CACHE (default ~/.cache/gptq-bridge/kernels), keyed by the
source, the nvcc version and the target architectures; a build is written to a temporary file and renamed into
place, so concurrent processes never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("gptq_mma.cu")
MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with float16 inputs

_VOID, _INT = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {  # name: argument types (every function returns int: 0 or a cudaError_t)
    "gb_q4_few_rows": [_VOID] * 3 + [_INT] + [_VOID] * 6 + [_INT] * 9 + [_VOID],
    "gb_q4_dequantize": [_VOID] * 4 + [_INT] * 6 + [_VOID],
    "gb_q4_many_rows": [_VOID] * 3 + [_INT] * 2 + [_VOID] * 5 + [_INT] * 11 + [_VOID],
}

_lib: ctypes.CDLL | None = None


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message says which, with nvcc's own output."""


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc: the first that exists."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates = [Path(h) / "bin" / "nvcc" for h in homes if h] + [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


def cache_dir() -> Path:
    return Path(os.environ.get("GPTQ_BRIDGE_KERNEL_CACHE") or Path.home() / ".cache" / "gptq-bridge" / "kernels")


def _architectures() -> list[tuple[int, int]]:
    """Compute capabilities to build for: every visible CUDA device's (at least MIN_CAPABILITY), else sm_80."""
    import torch

    caps = set()
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(c for c in caps if c >= MIN_CAPABILITY) or [MIN_CAPABILITY]


def _nvcc_command(nvcc: str, archs: list[tuple[int, int]], out: Path, source: Path) -> list[str]:
    cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-I", str(SOURCE.parent)]
    for major, minor in archs:
        arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")  # 9.0a: Hopper's wgmma (gptq_wgmma.cuh)
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd + ["-o", str(out), str(source)]


def build(nvcc: str | None = None, archs: list[tuple[int, int]] | None = None, source: Path = SOURCE) -> Path:
    """The path of the built library, compiling it first if this source/nvcc/architectures has no build yet.
    (`source`: another .cu file with a C interface, e.g. a benchmark's probe.)"""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME, or put nvcc on PATH) to build the CUDA kernel")
    archs = archs or _architectures()
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"{nvcc} --version failed: {exc}") from exc
    headers = b"".join(h.read_bytes() for h in sorted(SOURCE.parent.glob("*.cuh")))  # what gptq_mma.cu includes
    key = hashlib.sha256(source.read_bytes() + headers + version.encode() + repr(archs).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}_{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(_nvcc_command(nvcc, archs, Path(tmp), source), capture_output=True, text=True)
        if proc.returncode:
            output = (proc.stderr or proc.stdout).strip()
            lines = output.splitlines() or ["(no output)"]
            first_error = next((line for line in lines if "error" in line.lower()), lines[-1])
            raise BuildError(f"nvcc failed to build {source.name}: {first_error.strip()}\n{output[-3000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL:
    """The loaded library (built on first use), with every function's argument types declared."""
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(build()))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        lib.gb_error_string.argtypes, lib.gb_error_string.restype = [ctypes.c_int], ctypes.c_char_p
        _lib = lib
    return _lib


def check(code: int, what: str) -> None:
    """Raise with CUDA's own words when a launch returned an error."""
    if code == -1:
        raise ValueError(
            f"{what}: sizes or a bit width the kernel does not take, or a library built without it for this GPU"
        )
    if code:
        raise RuntimeError(f"{what}: {library().gb_error_string(code).decode()} (CUDA error {code})")
