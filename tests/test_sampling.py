"""Each sampling parameter changes the next-token distribution as it should, on controlled logits."""

import math

import pytest
import torch

from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.sampling import (
    Sampler,
    apply_penalties,
    min_p_filter,
    sample_batch,
    top_k_filter,
    top_p_filter,
    typical_filter,
)
from gptq_bridge.stream import make_params
from gptq_bridge.types import GenerationParams

EMPTY = torch.zeros(0, dtype=torch.long)


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def dist(probs=None, logits=None, context=EMPTY, eos=(), seed=0, **params):
    logits = logits if logits is not None else logits_of(probs)
    sampler = Sampler(GenerationParams(**params), logits.shape[0], set(eos), seed)
    return sampler.distribution(logits, context)


def kept(d):
    return set(torch.nonzero(d > 0).flatten().tolist())


P4 = [0.5, 0.3, 0.15, 0.05]


def test_greedy_is_one_hot_on_the_most_likely_token():
    d = dist(logits=torch.tensor([0.1, 2.0, 1.9, -1.0]), temperature=0)
    assert d.tolist() == [0.0, 1.0, 0.0, 0.0]
    sampler = Sampler(GenerationParams(), 4, set(), 0)
    assert sampler(torch.tensor([0.1, 2.0, 1.9, -1.0]), EMPTY) == 1


def test_temperature_one_is_the_softmax_and_scales_the_logits():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    assert torch.allclose(dist(logits=logits, temperature=1.0), torch.softmax(logits, -1))
    assert torch.allclose(dist(logits=logits, temperature=0.5), torch.softmax(logits / 0.5, -1))

    def entropy(d):
        return float(-(d * d.log()).sum())

    assert (
        entropy(dist(logits=logits, temperature=0.3))
        < entropy(dist(logits=logits, temperature=1.0))
        < entropy(dist(logits=logits, temperature=3.0))
    )


def test_top_k_keeps_the_k_most_likely_in_proportion():
    d = dist(P4, temperature=1.0, top_k=2)
    assert kept(d) == {0, 1}
    assert math.isclose(float(d[0] / d[1]), 0.5 / 0.3, rel_tol=1e-5)
    assert math.isclose(float(d.sum()), 1.0, rel_tol=1e-6)
    assert kept(dist(P4, temperature=1.0, top_k=0)) == {0, 1, 2, 3}  # 0 = off
    assert kept(dist(P4, temperature=1.0, top_k=10)) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    assert kept(dist(P4, temperature=1.0, top_p=0.45)) == {0}
    assert kept(dist(P4, temperature=1.0, top_p=0.75)) == {0, 1}
    assert kept(dist(P4, temperature=1.0, top_p=0.9)) == {0, 1, 2}
    assert kept(dist(P4, temperature=1.0, top_p=1.0)) == {0, 1, 2, 3}
    # order in the vocabulary does not matter
    assert kept(dist([0.05, 0.15, 0.3, 0.5], temperature=1.0, top_p=0.75)) == {2, 3}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_one():
    # threshold 0.25 * 0.5 = 0.125: 0.15 stays, 0.05 goes
    assert kept(dist(P4, temperature=1.0, min_p=0.25)) == {0, 1, 2}
    assert kept(dist(P4, temperature=1.0, min_p=0.7)) == {0}
    assert kept(dist(P4, temperature=1.0, min_p=0.0)) == {0, 1, 2, 3}


def test_typical_p_can_drop_the_most_likely_token():
    # one token at 0.4 and ten at 0.06: the entropy (2.05 nats) is near the small ones' surprise (2.81), far
    # from the big one's (0.92); 50% of the mass in order of typicality is nine small tokens.
    probs = [0.4] + [0.06] * 10
    d = dist(probs, temperature=1.0, typical_p=0.5)
    assert d[0] == 0
    assert len(kept(d)) == 9
    assert kept(dist(probs, temperature=1.0, typical_p=1.0)) == set(range(11))
    # a peaked distribution keeps its peak
    assert 0 in kept(dist([0.7, 0.1, 0.1, 0.1], temperature=1.0, typical_p=0.5))


def test_filters_always_keep_one_token():
    logits = logits_of(P4)
    assert kept(top_k_filter(logits, 1).exp()) == {0}
    assert kept(top_p_filter(logits, 0.01).exp()) == {0}
    assert len(kept(typical_filter(logits, 0.01).exp())) == 1
    assert kept(min_p_filter(logits, 1.0).exp()) == {0}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -1.0, 3.0, 1.0])
    context = torch.tensor([0, 1, 1])
    out = apply_penalties(logits, context, GenerationParams(repetition_penalty=2.0))
    assert out.tolist() == [1.0, -2.0, 3.0, 1.0]
    # greedy would pick token 2 either way; with token 2 seen and a strong penalty it no longer does
    assert dist(logits=logits, context=torch.tensor([2]), repetition_penalty=4.0).argmax() == 0


def test_repetition_penalty_range_limits_the_window():
    logits = torch.tensor([2.0, 2.0, 2.0])
    context = torch.tensor([0, 1, 2, 2])
    out = apply_penalties(logits, context, GenerationParams(repetition_penalty=2.0, repetition_penalty_range=2))
    assert out.tolist() == [2.0, 2.0, 1.0]
    out = apply_penalties(logits, context, GenerationParams(repetition_penalty=2.0, repetition_penalty_range=0))
    assert out.tolist() == [1.0, 1.0, 1.0]


def test_presence_and_frequency_penalties_subtract_once_and_per_occurrence():
    logits = torch.zeros(4)
    context = torch.tensor([1, 1, 1, 2])
    out = apply_penalties(logits, context, GenerationParams(presence_penalty=0.5))
    assert out.tolist() == [0.0, -0.5, -0.5, 0.0]
    out = apply_penalties(logits, context, GenerationParams(frequency_penalty=0.25))
    assert out.tolist() == [0.0, -0.75, -0.25, 0.0]
    out = apply_penalties(logits, context, GenerationParams(presence_penalty=-1.0))  # negative encourages
    assert out.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_banned_tokens_and_ban_eos_are_never_drawn():
    logits = torch.tensor([5.0, 4.0, 0.0, 0.0])
    assert dist(logits=logits, banned_token_ids=[0]).argmax() == 1
    d = dist(logits=logits, temperature=1.0, banned_token_ids=[0], ban_eos=True, eos=[1])
    assert kept(d) == {2, 3}
    with pytest.raises(GPTQBridgeError, match="banned_token_ids: 7"):
        Sampler(GenerationParams(banned_token_ids=[7]), 4, set(), 0)
    with pytest.raises(GPTQBridgeError, match="every token"):
        Sampler(GenerationParams(banned_token_ids=[0, 1, 2], ban_eos=True), 4, {3}, 0)


def test_draws_follow_the_distribution():
    logits = logits_of([0.6, 0.3, 0.1, 1e-9])
    sampler = Sampler(GenerationParams(temperature=1.0, top_k=2), 4, set(), seed=1234)
    counts = torch.bincount(torch.tensor([sampler(logits, EMPTY) for _ in range(3000)]), minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] / 3000 - 2 / 3) < 0.04  # 0.6 / 0.9 after top_k renormalises


MIXED = [  # one batch of rows that each sample differently
    dict(temperature=0),
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.0, typical_p=0.5),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.4),
    dict(temperature=0, presence_penalty=2.0),
]


def test_a_batch_draws_for_each_row_what_the_row_draws_alone():
    torch.manual_seed(0)
    logits = torch.randn(len(MIXED), 40) * 2
    context = torch.tensor([3, 3, 7, 1, 39])

    def samplers():
        return [Sampler(GenerationParams(**p), 40, set(), seed=100 + r) for r, p in enumerate(MIXED)]

    batched, alone = samplers(), samplers()
    for _ in range(25):
        together = sample_batch(logits, batched, [context] * len(MIXED))
        assert together == [s(logits[r], context) for r, s in enumerate(alone)]


@pytest.mark.parametrize("params", MIXED)
def test_batched_draws_follow_each_rows_distribution(params):
    torch.manual_seed(1)
    logits = torch.randn(12) * 1.5
    context = torch.tensor([3, 3, 7])
    want = Sampler(GenerationParams(**params), 12, set(), seed=0).distribution(logits, context)
    rows = 500  # 500 requests with these parameters and their own seeds, six steps: 3000 draws
    samplers = [Sampler(GenerationParams(**params), 12, set(), seed=r) for r in range(rows)]
    draws = [t for _ in range(6) for t in sample_batch(logits.expand(rows, 12), samplers, [context] * rows)]
    got = torch.bincount(torch.tensor(draws), minlength=12).float() / len(draws)
    assert set(torch.nonzero(got).flatten().tolist()) <= set(torch.nonzero(want).flatten().tolist())
    assert float((got - want).abs().sum()) / 2 < 0.05  # total variation: ~0.02 expected from 3000 draws


def test_same_seed_same_draws_other_seed_other_draws():
    logits = torch.zeros(100)

    def draws(seed):
        s = Sampler(GenerationParams(temperature=1.0), 100, set(), seed)
        return [s(logits, EMPTY) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 1.5),
        ("typical_p", 0.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty_range", -1),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("max_new_tokens", 0),
        ("seed", -1),
        ("stop", [""]),
        ("banned_token_ids", [-3]),
    ],
)
def test_out_of_range_values_name_the_parameter(name, value):
    with pytest.raises(GPTQBridgeError, match=rf"^{name}"):
        make_params(**{name: value})


def test_unknown_parameters_are_named():
    with pytest.raises(GPTQBridgeError, match="top_q: unknown parameter"):
        make_params(top_q=0.5)
