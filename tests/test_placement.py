"""The placement plan (a pure function over sizes and budgets), on the shapes of Llama-2-70B's six GPTQ branches."""

from __future__ import annotations

import pytest

from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.placement import GIB, Budget, ModelSizes, PlacementError, budgets_from, parse_size, plan_placement

# Llama-2-70B: hidden 8192, intermediate 28672, 80 layers, 64 heads of 128, 8 KV heads, vocabulary 32000
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 8192, 28672, 80, 64, 8, 32000
HEAD_DIM = HIDDEN // HEADS


def gptq_linear_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    """qweight + qzeros (int32 words) + fp16 scales + g_idx, as AutoGPTQ stores them."""
    groups = 1 if group == -1 else -(-rows // group)
    return rows * bits // 32 * cols * 4 + groups * (cols * bits // 32) * 4 + groups * cols * 2 + rows * 4


def llama70b(bits: int, group: int, kv_tokens: int = 4096) -> ModelSizes:
    kv_width = KV_HEADS * HEAD_DIM
    layer = (
        2 * gptq_linear_bytes(HIDDEN, HIDDEN, bits, group)  # q, o
        + 2 * gptq_linear_bytes(HIDDEN, kv_width, bits, group)  # k, v
        + 2 * gptq_linear_bytes(HIDDEN, INTER, bits, group)  # gate, up
        + gptq_linear_bytes(INTER, HIDDEN, bits, group)  # down
        + 2 * HIDDEN * 2  # two RMSNorm weights
    )
    return ModelSizes(
        embed=VOCAB * HIDDEN * 2,
        layers=(layer,) * LAYERS,
        head=HIDDEN * 2 + VOCAB * HIDDEN * 2,
        kv_per_layer=2 * kv_tokens * kv_width * 2,
    )


# the six branches and their checkpoint sizes on the model card, in GB
BRANCHES = {
    "4-bit no group": (4, -1, 35.33),
    "4-bit 32g act-order": (4, 32, 40.66),
    "4-bit 64g act-order": (4, 64, 37.99),
    "4-bit 128g act-order": (4, 128, 36.65),
    "3-bit no group": (3, -1, 26.78),
    "3-bit 128g act-order": (3, 128, 28.03),
}


def weights(sizes: ModelSizes) -> int:
    return sizes.embed + sum(sizes.layers) + sizes.head


@pytest.mark.parametrize("branch", BRANCHES)
def test_the_computed_sizes_are_the_checkpoints_sizes(branch):
    bits, group, card_gb = BRANCHES[branch]
    assert weights(llama70b(bits, group)) / 1e9 == pytest.approx(card_gb, rel=0.003)


def check_invariants(p, sizes: ModelSizes, budgets: list[Budget]):
    assert p.slots[0].embed and p.slots[-1].head
    assert sum(s.embed for s in p.slots) == sum(s.head for s in p.slots) == 1
    assert len(p.layer_slot) == LAYERS and list(p.layer_slot) == sorted(p.layer_slot)  # whole layers, in order
    covered = [i for s in p.slots for i in range(*s.layers)]
    assert covered == list(range(LAYERS))
    for s in p.slots:
        assert s.used <= s.budget
        n = s.layers[1] - s.layers[0]
        assert s.kv_bytes == n * sizes.kv_per_layer  # each layer's cache beside it
    assert sum(s.weights_bytes for s in p.slots) == weights(sizes)


@pytest.mark.parametrize("branch", BRANCHES)
def test_two_24gib_cards_hold_every_branch_split_in_two(branch):
    bits, group, _ = BRANCHES[branch]
    sizes = llama70b(bits, group)
    budgets = [Budget("cuda:0", 24 * GIB), Budget("cuda:1", 24 * GIB)]
    p = plan_placement(sizes, budgets)
    check_invariants(p, sizes, budgets)
    assert p.devices == ["cuda:0", "cuda:1"]
    first = p.slots[0]
    # the first card is filled as far as whole layers go: the next layer would not have fitted
    assert first.used + sizes.layers[0] + sizes.kv_per_layer > 24 * GIB
    assert p.layer_device(0) == "cuda:0" and p.layer_device(LAYERS - 1) == "cuda:1"


@pytest.mark.parametrize("branch", BRANCHES)
def test_one_48gib_card_holds_every_branch_whole(branch):
    bits, group, _ = BRANCHES[branch]
    sizes = llama70b(bits, group)
    p = plan_placement(sizes, [Budget("cuda:0", 48 * GIB)])
    check_invariants(p, sizes, [])
    assert not p.split and p.slots[0].layers == (0, LAYERS)


@pytest.mark.parametrize("branch", BRANCHES)
def test_one_24gib_card_and_the_cpu_hold_every_branch(branch):
    bits, group, _ = BRANCHES[branch]
    sizes = llama70b(bits, group)
    p = plan_placement(sizes, [Budget("cuda:0", 24 * GIB), Budget("cpu", 48 * GIB)])
    check_invariants(p, sizes, [])
    gpu, cpu = p.slots
    assert (gpu.device, cpu.device) == ("cuda:0", "cpu") and cpu.head
    # the card takes as many layers as fit: the 3-bit branches leave fewer for the CPU
    per_layer = sizes.layers[0] + sizes.kv_per_layer
    assert gpu.layers[1] == (24 * GIB - sizes.embed) // per_layer


@pytest.mark.parametrize("branch", BRANCHES)
def test_one_24gib_card_alone_says_how_much_is_missing(branch):
    bits, group, _ = BRANCHES[branch]
    sizes = llama70b(bits, group)
    with pytest.raises(PlacementError) as e:
        plan_placement(sizes, [Budget("cuda:0", 24 * GIB)])
    need = weights(sizes) + LAYERS * sizes.kv_per_layer
    missing = (need - 24 * GIB) / GIB
    msg = str(e.value)
    assert "does not fit" in msg and "missing on cuda:0" in msg and "cuda:0 holds embeddings, layers 0-" in msg
    # the shortfall named is within one layer of the true one (whole layers: a partly filled card wastes a little)
    named = float(msg.split(" missing on")[0].rsplit(": ", 1)[1].split()[0])
    assert missing - 0.01 <= named <= missing + (sizes.layers[0] + sizes.kv_per_layer) / GIB


def test_per_device_sizes_and_a_head_that_moves_on_alone():
    gpu = ModelSizes(embed=10, layers=(20,) * 4, head=30, kv_per_layer=5)
    cpu = ModelSizes(embed=10, layers=(40,) * 4, head=60, kv_per_layer=5)  # a CPU kernel that holds more
    for keys in (("cuda", "cpu"), ("cuda:0", "cpu")):  # by device type, or by device as the loader gives them
        p = plan_placement(dict(zip(keys, (gpu, cpu))), [Budget("cuda:0", 60), Budget("cpu", 1000)])
        assert [s.layers for s in p.slots] == [(0, 2), (2, 4)]
        assert p.slots[1].weights_bytes == 2 * 40 + 60
    # the last layer fits the first device but its head does not: the head goes on alone
    p = plan_placement(gpu, [Budget("cuda:0", 110), Budget("cuda:1", 40)])
    assert p.slots[0].layers == (0, 4) and not p.slots[0].head
    assert p.slots[1].head and p.slots[1].layers == (0, 0) and p.layer_slot == (0, 0, 0, 0)


def test_tied_heads_cost_nothing_beside_their_embeddings_and_a_copy_elsewhere():
    tied = ModelSizes(embed=10, layers=(20,), head=10, kv_per_layer=0, tied=True)
    assert plan_placement(tied, [Budget("cpu", 30)]).slots[0].weights_bytes == 30
    p = plan_placement(tied, [Budget("cpu", 29), Budget("cpu", 30)])  # the same device twice: two slots
    assert p.devices == ["cpu", "cpu"] and p.slots[1].head and p.slots[1].weights_bytes == 20 + 10


def test_the_embeddings_that_do_not_fit_the_first_device_are_named():
    with pytest.raises(PlacementError, match=r"cuda:0: the embeddings alone need .* missing there"):
        plan_placement(ModelSizes(embed=2 * GIB, layers=(1,), head=1, kv_per_layer=0), [Budget("cuda:0", GIB)])


def test_budgets_as_users_write_them():
    assert budgets_from(gpu_split=[20, 24.5]) == [Budget("cuda:0", 20 * GIB), Budget("cuda:1", int(24.5 * GIB))]
    assert budgets_from(gpu_split="20,24") == budgets_from(gpu_split=[20, 24])
    assert budgets_from(max_memory={"cpu": "48GiB", 1: "24GiB", 0: "20GiB"}) == [
        Budget("cuda:0", 20 * GIB),
        Budget("cuda:1", 24 * GIB),
        Budget("cpu", 48 * GIB),
    ]
    assert budgets_from(max_memory="0=20GiB, cpu=512MiB") == [Budget("cuda:0", 20 * GIB), Budget("cpu", 2**29)]
    assert budgets_from(max_memory=[("cpu", "1MiB"), ("cpu", 2)]) == [Budget("cpu", 2**20), Budget("cpu", 2 * GIB)]
    assert budgets_from() is None
    assert parse_size("24GB", "x") == 24 * 10**9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gpu_split=[20, 0]), r"gpu_split\[1\]: 0 must be more than zero"),
        (dict(gpu_split="20,,24"), r"gpu_split: '20,,24'"),
        (dict(gpu_split=["lots"]), r"gpu_split\[0\]: 'lots' is not a size"),
        (dict(max_memory={"gpu": "1GiB"}), r"max_memory: device 'gpu' is not understood"),
        (dict(max_memory="0:20GiB"), r"max_memory: '0:20GiB' is not DEVICE=SIZE"),
        (dict(max_memory={0: "1GiB", "cuda:0": "2GiB"}), r"max_memory: a device is named twice"),
        (dict(gpu_split=[1], max_memory={0: 1}), r"gpu_split and max_memory both given"),
    ],
)
def test_bad_budgets_are_named(kwargs, match):
    with pytest.raises(GPTQBridgeError, match=match):
        budgets_from(**kwargs)
