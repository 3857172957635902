"""The ExLlama kernel, as shipped by the `exllamav2` package (optional extra `exllama`): its GPTQ path,
`make_q_matrix` once per layer at load time and `gemm_half_q_half` per call. 4-bit, float16 only.

exllamav2 compiles its CUDA extension (`exllamav2_ext`) the first time it is imported, with nvcc (about two
minutes on an H100), unless a built `exllamav2_ext` module is already importable. Availability therefore
says why not (package missing, no CUDA device, no nvcc) without compiling; the compile happens only when
this kernel has passed every other check and is about to serve a checkpoint.

What `make_q_matrix` does with the tensors it is given, and what this module does about it:
- act-order checkpoints: it sorts the rows of `qweight` by group *in place* and fills `q_perm`/`q_invperm`
  (int16: at most 65,535 input features); it reads `g_idx` from host memory;
- it keeps raw pointers to every tensor (and to the `temp_dq` scratch where it dequantizes for many-row
  calls), so the module keeps references to all of them for its lifetime; after prepare() the `qweight`
  buffer holds exllamav2's shuffled layout, not the on-disk one;
- act-order: it assumes every group but the last has exactly `group_size` rows (prepare() checks g_idx);
- zero points are read in the v1 ("gptq") convention (stored zero + 1); a v2 checkpoint's zeros are
  shifted down by one at prepare time, which is exact unless a stored zero is 0 (then prepare() says so).
"""

from __future__ import annotations

import importlib.util
import shutil
import weakref

import torch

from ..config import QuantizeConfig
from ..errors import KernelError
from ..hookspecs import hookimpl
from ..packing import pack, unpack
from ..types import KernelSpec, LayerShape
from .base import GPTQLinear, scratch_lock
from .measured import MEASURED_US

# Dequantize scratch, float16 values (exllamav2's own default, 1 GiB at most). For more than 32 rows exllamav2
# dequantizes the whole weight into it and calls cuBLAS, but only when the scratch holds all K rows
# (`max_dq_rows`); otherwise every call runs its 4-rows-at-a-time kernel. 512 Mi values hold every Llama-2-70B
# layer (28672 x 8192 = 224 Mi).
_SCRATCH_ELEMENTS = 512 * 2**20
_scratch: dict[torch.device, torch.Tensor] = {}
_ext = None


def _extension():
    """exllamav2's compiled extension module (importing exllamav2 compiles it on first use)."""
    global _ext
    if _ext is None:
        from exllamav2 import ext  # noqa: PLC0415 - heavy and optional

        _ext = ext.exllamav2_ext
    return _ext


def _scratch_for(device: torch.device, elements: int) -> torch.Tensor:
    """A float16 scratch shared by the layers of a device. It only grows: a layer keeps the buffer it was given
    (exllamav2 holds its address), so a larger need gets a new buffer and older layers keep the old one."""
    have = _scratch.get(device)
    if have is None or have.numel() < elements:
        have = torch.empty(elements, dtype=torch.float16, device=device)
        _scratch[device] = have
    return have


class ExllamaQuantLinear(GPTQLinear):
    """GPTQ Linear running exllamav2's `gemm_half_q_half` (which itself dequantizes + cuBLAS for many rows)."""

    def __init__(self, layer: LayerShape, config: QuantizeConfig, dtype: torch.dtype):
        super().__init__(layer, config, dtype)
        self._handle = None
        self._keep: tuple = ()

    def prepare(self) -> None:
        if self._handle is not None:  # qweight is already in exllamav2's layout: doing it again would garble it
            return
        if self.qweight.device.type != "cuda":
            raise KernelError(f"the exllama kernel runs on CUDA devices, not {self.qweight.device}")
        ext = _extension()
        device = self.qweight.device
        qzeros = self.qzeros
        if self.zero_offset == 0:  # v2 zeros -> v1 (stored zero = zero - 1)
            zeros = unpack(qzeros, self.bits, 1, self.out_features)
            if bool((zeros == 0).any()):
                raise KernelError(
                    "the exllama kernel reads v1 zero points and this gptq_v2 checkpoint stores a "
                    "zero point of 0, which v1 cannot represent; use kernel 'triton' or 'torch'"
                )
            qzeros = pack(zeros - 1, self.bits, 1)
        qzeros = qzeros[:, : self.out_features // 8].contiguous()  # packed_size pads columns to a multiple of 32
        scales = self.scales.to(torch.float16).contiguous()
        qweight = self.qweight.contiguous()
        none = torch.empty((1, 1), device="meta")
        act_order = not torch.equal(self.g_idx, self.default_g_idx(device))
        if act_order:
            counts = torch.bincount(self.g_idx.long(), minlength=self.in_features // self.group_size)
            if bool((counts != self.group_size).any()):
                raise KernelError(
                    "the exllama kernel needs every act-order group to hold exactly group_size "
                    f"({self.group_size}) rows; this layer's g_idx does not"
                )
            q_perm = torch.empty(self.in_features, dtype=torch.int16, device=device)
            q_invperm = torch.empty_like(q_perm)
            g_idx = self.g_idx.to(device="cpu", dtype=torch.int32).contiguous()
        else:
            q_perm = q_invperm = g_idx = none
        max_dq_rows = max(1, min(self.in_features, _SCRATCH_ELEMENTS // self.out_features))
        scratch = _scratch_for(device, max_dq_rows * self.out_features)
        with torch.cuda.device(device):
            self._handle = ext.make_q_matrix(
                qweight, q_perm, q_invperm, none, none, none, none, qzeros, scales, g_idx, none, scratch, max_dq_rows
            )
        weakref.finalize(self, ext.free_q_matrix, self._handle)  # the handle is a host-side C++ object
        # exllamav2 keeps raw pointers into all of these (qweight now holds its own row order)
        self._keep = (qweight, q_perm, q_invperm, qzeros, scales, scratch)
        self.qweight = qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._handle is None:
            raise RuntimeError("prepare() was not called on this layer")
        if x.dtype != torch.float16:
            raise KernelError(f"the exllama kernel computes in float16, got {x.dtype}")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float16, device=x.device)
        if x2.shape[0]:  # exllamav2 would launch an empty grid
            with scratch_lock(x.device):  # many rows dequantize into the device's shared temp_dq
                _extension().gemm_half_q_half(x2, self._handle, out, False)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*shape[:-1], self.out_features)


def _check_available() -> str | None:
    if importlib.util.find_spec("exllamav2") is None:
        return "the exllamav2 package is not installed (pip install 'gptq-bridge[exllama]')"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _ext is None and importlib.util.find_spec("exllamav2_ext") is None:
        if torch.version.cuda is None:
            return "this torch build has no CUDA, which exllamav2's extension needs"
        if shutil.which("nvcc") is None and not _cuda_home_has_nvcc():
            return "exllamav2's extension is not built and nvcc (needed to build it) was not found"
    return None


def _cuda_home_has_nvcc() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME  # noqa: PLC0415

    return CUDA_HOME is not None and shutil.which("nvcc", path=f"{CUDA_HOME}/bin") is not None


def _check_layer(layer: LayerShape, config: QuantizeConfig) -> str | None:
    if layer.in_features % 32:
        return "input features must be a multiple of 32"
    if layer.out_features % 8:
        return "output features must be a multiple of 8"
    if layer.in_features > 65535:
        return "more than 65,535 input features (exllamav2 stores the row order as int16)"
    if config.group_size != -1 and config.group_size < 32:
        return f"group size {config.group_size} is below 32 (exllamav2 changes group once per 32 rows)"
    if config.group_size != -1 and config.group_size & (config.group_size - 1):
        return f"group size {config.group_size} is not a power of two (exllamav2 derives it as one)"
    if config.group_size != -1 and layer.in_features % config.group_size:
        return f"input features are not a multiple of the group size {config.group_size} (partial last group)"
    return None


def kernel_spec() -> KernelSpec:
    return KernelSpec(
        name="exllama",
        description="exllamav2's GPTQ kernel (gemm_half_q_half; extra 'exllama', compiles on first use)",
        bits=frozenset({4}),
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16}),
        measured_us=MEASURED_US.get("exllama", {}),
        # Ranked by its measured speed on CUDA (measured.py; tests/gpu checks it against the reference); the
        # priority orders it only where no measurement applies: below triton (10), above torch (0).
        priority=5,
        factory=ExllamaQuantLinear,
        check_available=_check_available,
        check_layer=_check_layer,
    )


@hookimpl
def gptq_register_kernels(register):
    register(kernel_spec())
