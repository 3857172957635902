"""One block's GPTQ: every Linear of a decoder block quantized in place, on the calibration states.

True-sequential within a block: layers that read the same input tensor (q/k/v; gate/up) form a step, and
each step sees the outputs of the steps quantized before it. The steps are discovered by watching which
Linears receive the same tensor, so any decoder architecture works. When the calibration set fits in one
forward pass, each Linear is quantized inside its own forward pre-hook (`QuantizeOnArrival`), so a block
costs one forward pass; otherwise each step re-runs the block over all batches (`StepStatistics`), stopping
at the step's last layer. With fp_targets, each layer is fitted to reproduce the *unquantized* model's
output of that layer (`FpFit`), so it makes up for the errors of the layers quantized before it instead of
taking them as given.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantizeConfig
from ..errors import QuantizeError
from .forward import StopForward, call_block, run_block
from .gptq import CrossMoment, Hessian, PreparedHessian, gptq_quantize, prepare_hessian
from .gptq_layer import pack_layer


@dataclass
class LayerReport:
    name: str
    loss: float  # GPTQ's weighted squared error of this layer
    damp: float  # damping actually used (raised automatically when the Cholesky factorisation failed)
    seconds: float


@dataclass
class BlockJob:
    """What quantizing one block needs besides its data: the settings, where its tensors and reports go."""

    settings: QuantizeConfig
    clip: bool
    refit: bool
    prefix: str  # e.g. model.layers.3
    tensors: dict[str, torch.Tensor]
    reports: list[LayerReport]

    def prepare(self, hessian: Hessian, name: str) -> PreparedHessian:
        """Factor a Hessian once for all the layers that read the same input."""
        return prepare_hessian(
            hessian,
            desc_act=self.settings.desc_act,
            damp_percent=self.settings.damp_percent,
            where=f"{self.prefix}.{name}",
        )

    def quantize_linear(
        self, name: str, module: nn.Linear, hessian: PreparedHessian, target: torch.Tensor | None = None
    ) -> None:
        """GPTQ on `module`; `target` replaces the weight as what the quantized layer should reproduce."""
        t = time.perf_counter()
        s = self.settings
        fmt = s.checkpoint_format
        result = gptq_quantize(
            module.weight.data if target is None else target,
            hessian,
            bits=s.bits,
            group_size=s.group_size,
            sym=s.sym,
            desc_act=s.desc_act,
            static_groups=s.static_groups,
            damp_percent=s.damp_percent,
            clip=self.clip,
            refit=self.refit,
            min_zero=1 if (fmt == "gptq" and not s.sym) else 0,
            where=f"{self.prefix}.{name}",
        )
        key = f"{self.prefix}.{name}"
        for k, v in pack_layer(result.layer, s.bits, fmt).items():
            self.tensors[f"{key}.{k}"] = v
        if module.bias is not None:
            self.tensors[f"{key}.bias"] = module.bias.detach().to(torch.float16).cpu()
        # later layers of this block must see what the checkpoint will compute
        module.weight.data = result.layer.dequantize().t().to(module.weight.device, module.weight.dtype).contiguous()
        self.reports.append(LayerReport(name=key, loss=result.loss, damp=result.damp, seconds=time.perf_counter() - t))


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's Linears by their names inside the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@contextlib.contextmanager
def pre_hooks(modules: Iterable[nn.Module], hook: Callable) -> Iterator[None]:
    """`hook` as a forward pre-hook of every module while the block runs."""
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class InputRecorder:
    """A forward pre-hook that records (Linear name, input tensor) for every call, in call order."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.names = {m: n for n, m in layers.items()}
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.calls.append((self.names[module], args[0]))


def input_groups(calls: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
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


def discover_steps(block, layers, state, kwargs) -> list[list[str]]:
    """Linears in call order, grouped into steps of layers that receive the very same input tensor."""
    recorder = InputRecorder(layers)
    with pre_hooks(layers.values(), recorder):
        call_block(block, state, kwargs)
    return input_groups(recorder.calls)


def white_hessians(names: Iterable[str], layers: dict[str, nn.Linear], done: set[str]) -> dict[str, Hessian]:
    """Identity Hessians for the Linears in `names` not yet done: a Linear the forward never called has no data,
    so it is quantized as if its inputs were white."""
    hessians = {}
    for n in names:
        if n not in done:
            h = Hessian(layers[n].in_features, device=layers[n].weight.device)
            h.sum += torch.eye(h.columns, dtype=h.sum.dtype, device=h.sum.device)
            h.count = 1
            hessians[n] = h
    return hessians


class FpFit:
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


def fp_input(block: nn.Module, first: nn.Linear, state: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run the unquantized `block` on one batch up to the Linear `first`; its input."""
    recorder = InputRecorder({"first": first})

    def stop_after_recording(module, args):
        recorder(module, args)
        raise StopForward

    with pre_hooks([first], stop_after_recording):
        try:
            call_block(block, state, kwargs)
        except StopForward:
            pass
    if not recorder.calls:
        raise QuantizeError(
            "fp_targets: the unquantized copy of the block never reached the layer the quantized block did"
        )
    return recorder.calls[0][1]


class QuantizeOnArrival:
    """The one-pass path's forward pre-hook: each Linear is quantized when the forward pass reaches it, so
    everything after it sees its quantized output. Layers fed the same tensor (q/k/v) share one Hessian,
    prepared when the first of them is reached; with `fp_fits`, the step's layers are fitted to the
    unquantized block's outputs."""

    def __init__(
        self,
        job: BlockJob,
        layers: dict[str, nn.Linear],
        fp_fits: dict[str, tuple[FpFit, torch.Tensor]],
        done: set[str],
    ):
        self.job = job
        self.names = {m: n for n, m in layers.items()}
        self.fp_fits = fp_fits  # first layer of a step -> fit, unquantized input
        self.done = done
        self.x: torch.Tensor | None = None  # the input of the step being quantized
        self.hessian: PreparedHessian | None = None
        self.fit: FpFit | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        name = self.names[module]
        if self.x is not x:
            h = Hessian(x.shape[-1], device=x.device)
            h.add(x)
            self.x, self.hessian, self.fit = x, self.job.prepare(h, name), None
            if name in self.fp_fits:
                self.fit, x_fp = self.fp_fits.pop(name)
                self.fit.add(x, x_fp)
        if name not in self.done:
            self.done.add(name)
            target = None
            if self.fit is not None and name in self.fit.names:
                target = self.fit.target(name, module.weight.data, self.hessian)
            self.job.quantize_linear(name, module, self.hessian, target)


class StepStatistics:
    """The step-by-step path's forward pre-hook: sums one step's statistics (a Hessian per distinct input, and
    the fp_targets statistic) over the calibration batches, then ends the forward pass after the step's last
    layer when true-sequential (nothing after it matters for this step)."""

    def __init__(self, step: list[str], layers: dict[str, nn.Linear], fit: FpFit | None, stop_when_done: bool):
        self.step = step
        self.names = {m: n for n, m in layers.items()}
        self.hessians = {n: Hessian(layers[n].in_features, device=layers[n].weight.device) for n in step}
        self.fit = fit
        self.stop_when_done = stop_when_done
        self.remaining: set[str] = set()
        self.x: torch.Tensor | None = None  # the last input seen in this batch, and its Hessian
        self.shared: Hessian | None = None
        self.fp_input: torch.Tensor | None = None

    def start_batch(self, fp_input: torch.Tensor | None) -> None:
        self.fp_input = fp_input
        self.remaining.update(self.step)
        self.x = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        name = self.names[module]
        if name not in self.remaining:
            return
        x = args[0]
        if self.x is x:  # same tensor as the previous layer of this step: same statistics
            self.hessians[name] = self.shared
        else:
            self.hessians[name].add(x)
            self.x, self.shared = x, self.hessians[name]
            if self.fit is not None:
                self.fit.add(x, self.fp_input)
        self.remaining.discard(name)
        if not self.remaining and self.stop_when_done:
            raise StopForward

    def release_inputs(self) -> None:
        self.x = self.shared = self.fp_input = None


def _quantize_in_one_pass(
    block: nn.Module,
    states: list[torch.Tensor],
    kwargs_list: list[dict],
    job: BlockJob,
    fp_states: list[torch.Tensor] | None,
):
    layers = linears(block)
    done: set[str] = set()
    fp_fits: dict[str, tuple[FpFit, torch.Tensor]] = {}
    if fp_states is not None:  # the unquantized block first: its steps, and what each Linear sees
        recorder = InputRecorder(layers)
        with pre_hooks(layers.values(), recorder):
            fp_outputs = run_block(block, fp_states, kwargs_list)
        first_input = dict(reversed(recorder.calls))
        fp_fits = {step[0]: (FpFit(layers, step), first_input[step[0]]) for step in input_groups(recorder.calls)}
        del recorder, first_input

    with pre_hooks(layers.values(), QuantizeOnArrival(job, layers, fp_fits, done)):
        outputs = run_block(block, states, kwargs_list)
    leftover = white_hessians(layers, layers, done)
    if leftover:
        for n, h in leftover.items():
            job.quantize_linear(n, layers[n], job.prepare(h, n))
        outputs = run_block(block, states, kwargs_list)
    return (outputs, fp_outputs) if fp_states is not None else outputs


def _quantize_step(
    step: list[str],
    block: nn.Module,
    layers: dict[str, nn.Linear],
    states,
    kwargs_list,
    job: BlockJob,
    true_sequential: bool,
    fp_block: nn.Module | None,
    fp_layers: dict[str, nn.Linear],
    fp_states,
    done: set[str],
) -> None:
    """Sum one step's statistics over all batches, then quantize its layers."""
    fit = FpFit(layers, step) if fp_block is not None else None
    stats = StepStatistics(step, layers, fit, stop_when_done=true_sequential)
    with pre_hooks([layers[n] for n in step], stats):
        for b, (h, kw) in enumerate(zip(states, kwargs_list)):
            stats.start_batch(fp_input(fp_block, fp_layers[step[0]], fp_states[b], kw) if fit is not None else None)
            try:
                call_block(block, h, kw)
            except StopForward:
                pass
    stats.release_inputs()
    hessians = stats.hessians
    for n in step:
        if hessians[n].count == 0:
            continue
        done.add(n)
    missing = {n: h for n, h in hessians.items() if h.count == 0}
    hessians.update(white_hessians(missing, layers, done))
    prepared: dict[int, PreparedHessian] = {}
    for n in step:
        h = hessians[n]
        if id(h) not in prepared:
            prepared[id(h)] = job.prepare(h, n)
        target = None
        if fit is not None and n not in missing and fit.count > 0:
            target = fit.target(n, layers[n].weight.data, prepared[id(h)])
        job.quantize_linear(n, layers[n], prepared[id(h)], target)
        done.add(n)


def _quantize_step_by_step(
    block: nn.Module,
    states: list[torch.Tensor],
    kwargs_list: list[dict],
    job: BlockJob,
    true_sequential: bool,
    fp_states: list[torch.Tensor] | None,
):
    # The statistics of a step are summed over the batches before its layers are quantized. With fp_states,
    # an unquantized copy of the block gives each batch's targets.
    layers = linears(block)
    done: set[str] = set()
    fp_block = copy.deepcopy(block) if fp_states is not None else None
    fp_layers = linears(fp_block) if fp_block is not None else {}
    if true_sequential:
        steps = discover_steps(block, layers, states[0], kwargs_list[0])
    else:
        steps = [list(layers)]  # every layer sees the unquantized block
    for step in steps:
        _quantize_step(
            step, block, layers, states, kwargs_list, job, true_sequential, fp_block, fp_layers, fp_states, done
        )
    for n, h in white_hessians(layers, layers, done).items():  # Linears no forward pass reached
        job.quantize_linear(n, layers[n], job.prepare(h, n))
        done.add(n)
    outputs = run_block(block, states, kwargs_list)
    if fp_block is None:
        return outputs
    fp_outputs = run_block(fp_block, fp_states, kwargs_list)
    del fp_block
    return outputs, fp_outputs


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    states: list[torch.Tensor],
    kwargs_list: list[dict],
    job: BlockJob,
    true_sequential: bool,
    fp_states: list[torch.Tensor] | None = None,
):
    """Quantize every Linear of one block in place; returns the block's outputs (the next block's inputs).

    With `fp_states` (the same calibration windows through the unquantized model; needs true_sequential),
    each layer is fitted to reproduce the unquantized model's output of that layer rather than its own output
    on the drifted inputs (`FpFit`), and the result is (outputs, unquantized outputs).
    """
    if fp_states is not None and not true_sequential:
        raise QuantizeError("fp_targets needs true_sequential")
    if true_sequential and len(states) == 1:
        return _quantize_in_one_pass(block, states, kwargs_list, job, fp_states)
    return _quantize_step_by_step(block, states, kwargs_list, job, true_sequential, fp_states)
