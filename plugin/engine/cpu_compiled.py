"""The CPU decode step's stretch between two attentions, compiled once per machine (optional).

On a small CPU model the decode step's small ops cost as much as its matmuls: ~25 torch ops between two
attentions (o projection, residual, RMSNorm, gate/up, SiLU x up, down, residual, the next layer's RMSNorm, q/k/v,
rotary), each dispatched from Python. `cpu_step.between` is that stretch; here it is exported once with
`torch.export` and compiled ahead of time by Inductor (AOTInductor) into one native call, with the batch size
dynamic and every weight an input, so one package serves every layer and every batch. The four matmuls stay
torch's packed int4 op; the ops around them become a few fused loops. The result is the same numbers as the
ops one by one (checked when the package is loaded; a package that disagrees is not used).

- Compiling takes about a minute on a small CPU and needs a C++ compiler: it runs in a separate process (at low
  priority) the first time a model of this shape decodes on this machine, and the step runs op by op until the
  package is ready. A short-lived process (one CLI answer) leaves it running; it finishes for the next one.
  Later runs load it from the user cache (`default_model.cache_root() / "compiled"`), keyed by the shapes,
  torch's version and the CPU's instruction sets. Inductor's own cache goes there too.
- No C++ compiler, a failed build (kept as a `.failed` note, not retried), or `GPTQ_BRIDGE_CPU_COMPILE=0`:
  the step runs op by op; `CompiledBetween.status` and the log (logger "gptq_bridge") say why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from ..kernels.cpu_int4 import BLOCK, COMPUTE
from .cpu_step import LayerCalls, between

ENV = "GPTQ_BRIDGE_CPU_COMPILE"  # "0": never compile the CPU decode step
log = logging.getLogger("gptq_bridge")
_BUILDS: dict[Path, subprocess.Popen] = {}  # builds this process started: one per package, however many models
_INPUTS = ("post_w", "in_w", "o_p", "o_s", "gu_p", "gu_s", "d_p", "d_s", "qkv_p", "qkv_s")


def _int4(packed: torch.Tensor, scale_zero: torch.Tensor):
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, BLOCK, scale_zero)


class Between(nn.Module):
    """`cpu_step.between` from layer j's attention output to layer j+1's q/k and v, for plain cpu-int4 layers."""

    def __init__(self, heads: int, kv_heads: int, eps_post: float, eps_in: float, dtype: torch.dtype):
        super().__init__()
        self.heads, self.kv_heads, self.eps_post, self.eps_in, self.dtype = heads, kv_heads, eps_post, eps_in, dtype

    def forward(self, h, attn, post_w, in_w, o_p, o_s, gu_p, gu_s, d_p, d_s, qkv_p, qkv_s, cos, sin):
        o, gate_up, down = _int4(o_p, o_s), _int4(gu_p, gu_s), _int4(d_p, d_s)  # (unused slots: placeholders)
        c = LayerCalls((in_w, 0.0), (post_w, self.eps_post), None, COMPUTE, o, COMPUTE, gate_up, COMPUTE, down, COMPUTE)
        nxt = LayerCalls((in_w, self.eps_in), (post_w, 0.0), _int4(qkv_p, qkv_s), COMPUTE, *(None, COMPUTE) * 3)
        return between(h, attn, c, nxt, cos, sin, self.heads, self.kv_heads, self.dtype)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _spec(step) -> dict | None:
    """What decides the package: the module's constants and every input's shape and dtype."""
    fwd = step.fwd
    eps = {c.in_norm[1] for c in step.calls} | {c.post_norm[1] for c in step.calls}
    if len(eps) != 1:
        return None
    tensors = {name: t for name, t in zip(_INPUTS, step_inputs(step, 0))}
    return {
        "heads": fwd.heads,
        "kv_heads": fwd.kv_heads,
        "head_dim": fwd.head_dim,
        "eps": eps.pop(),
        "dtype": str(step.dtype).removeprefix("torch."),
        "inputs": {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in tensors.items()},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_flags": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16],
    }


def step_inputs(step, j: int) -> tuple[torch.Tensor, ...]:
    """The weights of the stretch from layer j to layer j + 1, in `Between.forward`'s order."""
    here, nxt = step.int4_layers[j], step.int4_layers[j + 1]
    qkv = nxt[0].weights
    o, gu, down = (m.weights for m in here[1:])
    return (
        step.calls[j].post_norm[0],
        step.calls[j + 1].in_norm[0],
        *(o.packed, o.scale_zero, gu.packed, gu.scale_zero, down.packed, down.scale_zero),
        *(qkv.packed, qkv.scale_zero),
    )


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _example(spec: dict, rows: int) -> tuple[torch.Tensor, ...]:
    d, heads = spec["head_dim"], spec["heads"]
    dtype = _dtype(spec["dtype"])
    hidden = spec["inputs"]["post_w"][0][0]
    weights = [torch.zeros(shape, dtype=_dtype(t)) for shape, t in spec["inputs"].values()]
    return (
        torch.randn(rows, hidden, dtype=dtype),
        torch.randn(rows, heads * d, dtype=dtype),
        *weights,
        torch.randn(rows, 1, d, dtype=dtype),
        torch.randn(rows, 1, 2, d // 2, dtype=dtype),
    )


def build(spec: dict, path: Path) -> None:
    """Export and compile the package for `spec` into `path` (atomically). Runs in its own process."""
    module = Between(spec["heads"], spec["kv_heads"], spec["eps"], spec["eps"], _dtype(spec["dtype"]))
    rows = torch.export.Dim("rows", min=1, max=1024)
    dynamic = ({0: rows}, {0: rows}) + (None,) * len(_INPUTS) + ({0: rows}, {0: rows})
    with torch.inference_mode():
        program = torch.export.export(module, _example(spec, 3), dynamic_shapes=dynamic)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    os.replace(tmp, path)


def compiler_missing() -> str | None:
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH to compile it"
    return None


class CompiledBetween:
    """The package for one CPU decode step: built in the background if needed, loaded when ready, and handed
    out by `runner()` once loaded and checked (None until then, and for good if it cannot be had)."""

    def __init__(self, step, spec: dict, path: Path):
        self.path, self.failed = path, path.with_suffix(".failed")
        self.inputs = [step_inputs(step, j) for j in range(len(step.calls) - 1)]
        self._step, self._spec = step, spec
        self._runner = None
        self._proc: subprocess.Popen | None = None
        self.status = "compiling"
        self._other: int | None = None  # another process's build of the same package, still running
        if not path.is_file():
            self._proc = _BUILDS.get(path)
            if self._proc is None or self._proc.poll() is not None:
                self._other = _building(path)
                if self._other is None:
                    self._start_build()

    def _start_build(self) -> None:
        from ..default_model import cache_root

        self.path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_root() / "inductor"), OMP_NUM_THREADS="1")
        logfile = open(self.path.with_suffix(".log"), "w")  # noqa: SIM115 - the child writes it until it ends
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, json.dumps(self._spec), str(self.path)],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env=env,
        )
        logfile.close()
        _BUILDS[self.path] = self._proc
        try:  # so a process started meanwhile (the next CLI answer) waits for this build instead of repeating it
            _marker(self.path).write_text(str(self._proc.pid))
        except OSError:
            pass
        log.info("gptq-bridge: compiling the CPU decode step in the background: %s", self.path)

    def runner(self):
        """The loaded package, or None (still building, or not to be had). Never waits for the build; loading
        takes a few milliseconds (torch's C++ package loader, no Inductor import)."""
        if self._runner is not None or self.status != "compiling":
            return self._runner
        if self._proc is not None and self._proc.poll() is None:
            return None
        if self._other is not None:
            if _alive(self._other):
                return None
            self._other = None
            if not self.path.is_file():  # that build ended without a package: try once here
                self._start_build()
                return None
        self._load()
        return self._runner

    def wait(self, timeout: float | None = None) -> str:
        """Wait for the build and load it (tests, benchmarks); returns `status`."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self._other is not None and _alive(self._other):
            if deadline is not None and time.monotonic() > deadline:
                return self.status
            time.sleep(0.2)
        self.runner()
        if self._proc is not None:
            self._proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.runner()
        return self.status

    def _give_up(self, why: str) -> None:
        self.status = f"op by op: {why}"
        log.info("gptq-bridge: the CPU decode step runs op by op: %s", why)

    def _load(self) -> None:
        if not self.path.is_file():
            note = self.path.with_suffix(".log")
            tail = note.read_text(errors="replace")[-2000:] if note.is_file() else ""
            self.failed.write_text(tail)
            return self._give_up(f"compiling it failed (see {self.failed})")
        try:
            loader = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, -1)

            def runner(*args):
                return loader.boxed_run(list(args))  # flat outputs: h, qk, v

            step = self._step
            gen = torch.Generator().manual_seed(0)
            d = step.fwd.head_dim
            probe = [
                torch.randn(2, w, generator=gen, dtype=step.dtype)
                for w in (step.fwd.embed.weight.shape[1], step.fwd.heads * d)
            ]
            cos, sin = step.cos[:2, None], step.sin[:2, None].view(2, 1, 2, d // 2)
            with torch.inference_mode():
                got = runner(*probe, *self.inputs[0], cos, sin)
                want = between(
                    *probe, step.calls[0], step.calls[1], cos, sin, step.fwd.heads, step.fwd.kv_heads, step.dtype
                )
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the op-by-op step in place
            self.failed.write_text(f"{type(exc).__name__}: {exc}")
            return self._give_up(f"the compiled package could not be used ({type(exc).__name__}: {exc})")
        self._runner = runner
        self.status = "compiled"


def _marker(path: Path) -> Path:
    return path.with_suffix(".building")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that number
        return True
    return True


def _building(path: Path) -> int | None:
    """The pid of another process's running build of `path`, from its marker (None: none runs)."""
    try:
        pid = int(_marker(path).read_text())
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and _alive(pid) else None


def for_step(step) -> CompiledBetween | None:
    """The compiled stretch for a CPU decode step whose layers are all plain cpu-int4 (None: op by op)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    spec = _spec(step)
    if spec is None:
        log.info("gptq-bridge: the CPU decode step runs op by op: its layers' norms differ in epsilon")
        return None
    from ..default_model import cache_root

    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root() / "compiled" / f"cpu-decode-{key}.pt2"
    if path.with_suffix(".failed").is_file():
        log.info(
            "gptq-bridge: the CPU decode step runs op by op: compiling it failed before (%s)",
            path.with_suffix(".failed"),
        )
        return None
    missing = None if path.is_file() else compiler_missing()
    if missing:
        log.info("gptq-bridge: the CPU decode step runs op by op: %s", missing)
        return None
    try:
        return CompiledBetween(step, spec, path)
    except OSError as exc:  # an unwritable cache, no fork: the step runs op by op
        log.info("gptq-bridge: the CPU decode step runs op by op: cannot build it in %s (%s)", path.parent, exc)
        return None


def main(spec_json: str, out: str) -> int:
    if hasattr(os, "nice"):
        os.nice(10)  # in the background of a decoding process: its threads come first
    torch.set_num_threads(1)
    path = Path(out)
    try:
        build(json.loads(spec_json), path)
    except Exception:  # noqa: BLE001 - the note keeps later runs from trying again
        import traceback

        path.with_suffix(".failed").write_text(traceback.format_exc()[-4000:])
        raise
    finally:
        _marker(path).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
