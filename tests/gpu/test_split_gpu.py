"""A model split between the GPU and the CPU (and between slots of one GPU), with real transfers: greedy tokens
equal the unsplit model's where its choice is clear, for the engine (a CUDA graph per GPU segment, the CPU
segment eager) and for transformers' forward (pytest -m gpu tests/gpu)."""

import os
import threading

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: these tests run the compiled kernels", allow_module_level=True)
pytest.importorskip("triton")

from tiny_checkpoints import build, llama_config, tiny_tokenizer  # noqa: E402

import gptq_bridge  # noqa: E402
from gptq_bridge.api import load_options  # noqa: E402
from gptq_bridge.engine.generator import engine_for  # noqa: E402
from gptq_bridge.engine.graphs import GraphedDecode  # noqa: E402
from gptq_bridge.loader import plan_load  # noqa: E402
from gptq_bridge.plugins import resolve  # noqa: E402

DEV = torch.device("cuda")
KV = 512


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = llama_config(hidden=512, intermediate=1024, layers=6, vocab=512)
    config.max_position_embeddings = 512
    path = build(tmp_path_factory.mktemp("split") / "ck", bits=4, group_size=128, desc_act=True, hf_config=config).path
    tiny_tokenizer(512).save_pretrained(str(path))
    return path


def budgets(ckpt, devices: list[str], layers: list[int]) -> list[tuple[str, str]]:
    """(device, size) pairs that hold exactly `layers[i]` decoder layers on `devices[i]` (the head on the last)."""
    plan = plan_load(
        resolve(str(ckpt)), load_options(max_memory=[(d, "64GiB") for d in dict.fromkeys(devices)], kv_cache=KV)
    )
    out = []
    for i, (dev, n) in enumerate(zip(devices, layers)):
        s = plan.sizes[dev]
        size = n * (s.layers[0] + s.kv_per_layer) + (s.embed if i == 0 else 0)
        size += s.head if i == len(devices) - 1 else 0
        out.append((dev, f"{size}B"))
    return out


def clear_agreement(whole, split, prompt: str, steps: int = 64):
    """The split model's greedy tokens, checked against the unsplit model's forward where its choice is clear."""
    result = split.generate(prompt, max_new_tokens=steps, ban_eos=True)
    ids = torch.tensor([whole.tokenizer(prompt)["input_ids"] + result.token_ids], device=DEV)
    with torch.inference_mode():
        ref = whole.model(ids).logits[0, -steps - 1 : -1].float()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * ref.abs().amax(dim=-1)
    picked = torch.tensor(result.token_ids, device=DEV)
    assert clear.sum() > steps // 4
    assert (ref.argmax(-1) == picked)[clear].all()
    return result.token_ids


@pytest.mark.parametrize(
    "devices, layers",
    [(["cuda:0", "cpu"], [3, 3]), (["cuda:0", "cuda:0"], [2, 4]), (["cuda:0", "cpu", "cuda:0"], [2, 2, 2])],
    ids=["gpu+cpu", "two-gpu-slots", "gpu+cpu+gpu"],
)
def test_engine_split_gives_the_unsplit_greedy_tokens(ckpt, devices, layers):
    whole = gptq_bridge.load_model(str(ckpt), device="cuda", kv_cache=KV)
    split = gptq_bridge.load_model(str(ckpt), max_memory=budgets(ckpt, devices, layers), kv_cache=KV)
    assert split.placement.devices == devices
    assert [s.layers[1] - s.layers[0] for s in split.placement.slots] == layers
    engine = engine_for(split)
    assert isinstance(engine.decode, GraphedDecode)
    graphs = [e.graph is not None for e in engine.decode.captured[1]]
    assert graphs == [d.startswith("cuda") for d in devices]  # a graph per GPU segment, the CPU one eager
    for p in ("the a of", "is it you that"):
        want = whole.generate(p, max_new_tokens=64, ban_eos=True).token_ids
        got = clear_agreement(whole, split, p)
        if "cpu" not in devices:  # the same kernels on the same GPU: the same tokens, bit for bit
            assert got == want


def test_split_batches_concurrent_requests(ckpt):
    split = gptq_bridge.load_model(str(ckpt), max_memory=budgets(ckpt, ["cuda:0", "cpu"], [3, 3]), kv_cache=KV)
    prompts = [f"the a w{i}" for i in range(8)]
    alone = {p: split.generate(p, max_new_tokens=32, ban_eos=True).token_ids for p in prompts}
    results = {}
    barrier = threading.Barrier(len(prompts))

    def run(p):
        barrier.wait()
        results[p] = split.generate(p, max_new_tokens=32, ban_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same = sum(results[p] == alone[p] for p in prompts)
    assert same >= 7, f"{same}/8 batched requests gave the tokens they give alone"


def test_transformers_path_split_gives_the_unsplit_greedy_tokens(ckpt):
    whole = gptq_bridge.load_model(str(ckpt), device="cuda", engine="off")
    split = gptq_bridge.load_model(
        str(ckpt), max_memory=budgets(ckpt, ["cuda:0", "cpu"], [3, 3]), kv_cache=KV, engine="off"
    )
    assert split.model.model.layers[5].input_layernorm.weight.device.type == "cpu"
    assert split.model.lm_head.weight.device.type == "cpu"
    clear_agreement(whole, split, "the a of", steps=32)
