"""Two models on one GPU, called from two threads at once, give what each gives alone.

The kernels' scratch buffers (the gathered activations, split-K partial sums) are shared by every model on a
device, while each model's generations are serialised by its own lock; `kernels.base.scratch_lock` keeps one
layer call's launches from interleaving with another's.

Run: `python -m pytest -m gpu tests/gpu/test_shared_scratch_gpu.py` on a CUDA machine.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: these tests run the compiled kernels", allow_module_level=True)

from tiny_checkpoints import build, llama_config  # noqa: E402

import gptq_bridge  # noqa: E402
from gptq_bridge.plugins import registered_kernels  # noqa: E402

ROUNDS = 30
ROWS = (1, 3, 8, 24, 40)  # decode (split-K), a few rows, and past the few-rows kernels


def available_kernels() -> list[str]:
    """The GPU kernels that use the shared scratch and run here."""
    return [
        k.name for k in registered_kernels() if k.name in ("mma", "triton", "exllama") and k.check_available() is None
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two different act-order checkpoints (their activations are gathered into the scratch) with Linears wide
    enough for split-K."""
    root = tmp_path_factory.mktemp("scratch")
    config = llama_config(hidden=1024, intermediate=2816, layers=2, vocab=512)
    return [
        build(root / f"m{i}", bits=4, group_size=128, desc_act=True, hf_config=config, seed=10 + i).path
        for i in range(2)
    ]


def logits_of(lm, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [lm.model(ids).logits.float().cpu() for ids in inputs for _ in range(ROUNDS // len(inputs))]


@pytest.mark.parametrize("kernel", available_kernels())
def test_two_models_in_two_threads_match_each_alone(checkpoints, kernel):
    models = [
        gptq_bridge.load_model(str(path), kernel=kernel, device="cuda", dtype=torch.float16) for path in checkpoints
    ]
    gen = torch.Generator().manual_seed(0)
    inputs = [[torch.randint(0, 512, (1, m), generator=gen).cuda() for m in ROWS] for _ in models]
    alone = [logits_of(lm, xs) for lm, xs in zip(models, inputs)]
    torch.cuda.synchronize()

    together: list[list[torch.Tensor] | None] = [None, None]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        together[i] = logits_of(models[i], inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert together[i] is not None
        for a, b in zip(alone[i], together[i]):
            # the same launches on the same inputs: equal up to the fp16 rounding of the summation order (exllama's
            # split-K adds with atomics: measured 0.4% of the largest logit), where a call that read another
            # model's scratch would be off by the size of the values themselves
            err = float((a - b).abs().max() / a.abs().max())
            assert err < 0.02, (kernel, i, err)
