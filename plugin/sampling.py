"""From the logits of one position to the next token: penalties, bans, temperature, truncation, a draw.

Order (text-generation-webui's default): repetition penalty, presence and frequency penalties, bans, then
temperature, top_k, top_p, typical_p, min_p on the probabilities that remain. Each truncation keeps at least
the most likely token, so a draw always has something to draw from. Temperature 0 means greedy: the most
likely token after penalties and bans.

`sample_batch` does all of it for many rows at once on the logits' device (the decode engine's batch; one row
for the eager generator), with one read back for the whole batch; `draw_batch` is the same without the read
back (the engine feeds the tokens to its next step on the device). Values sent from the host go through pinned
memory without waiting on the device, so drawing never stalls behind the step that is still running. Each row's draw is inverse-CDF sampling
with one uniform number from its own CPU `torch.Generator`, so a seed gives the same tokens whatever device
computed the logits (up to that device's arithmetic) and whichever requests shared the batch.
"""

from __future__ import annotations

import torch

from .errors import GPTQBridgeError
from .transfer import to_device
from .types import GenerationParams

NEG_INF = float("-inf")


def apply_penalties(logits: torch.Tensor, context: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Repetition (CTRL-style: divide positive logits, multiply negative ones), presence and frequency penalties.

    `context` holds the token ids so far (prompt and generated); only the last `repetition_penalty_range`
    of them count when that is non-zero.
    """
    rep, pres, freq = params.repetition_penalty, params.presence_penalty, params.frequency_penalty
    if (rep == 1.0 and pres == 0.0 and freq == 0.0) or context.numel() == 0:
        return logits
    vocab = logits.shape[-1]
    window = context[-params.repetition_penalty_range :] if params.repetition_penalty_range else context
    window = to_device(window[window < vocab], torch.long, logits.device)  # (filtered on the host: no device sync)
    counts = torch.zeros(vocab, dtype=torch.long, device=logits.device).scatter_add_(0, window, torch.ones_like(window))
    seen = counts > 0
    out = logits.clone()
    if rep != 1.0:
        picked = out[seen]
        out[seen] = torch.where(picked > 0, picked / rep, picked * rep)
    if pres != 0.0:
        out = out - pres * seen.to(out.dtype)
    if freq != 0.0:
        out = out - freq * counts.to(out.dtype)
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities add up to at least `top_p` (nucleus sampling)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass ranked above each token
    drop_sorted = before >= top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def typical_filter(logits: torch.Tensor, typical_p: float) -> torch.Tensor:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy, up to `typical_p` mass."""
    if typical_p >= 1.0:
        return logits
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    finite = torch.isfinite(logp)
    entropy = -(torch.where(finite, p * logp, torch.zeros_like(p))).sum()
    score = torch.where(finite, (-logp - entropy).abs(), torch.full_like(p, float("inf")))
    sorted_score, order = torch.sort(score)
    sorted_p = p[order]
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    drop_sorted = before >= typical_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the most likely one."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), NEG_INF)


class Sampler:
    """One generation's sampling state: the parameters, the ban mask and the random generator."""

    def __init__(self, params: GenerationParams, vocab_size: int, eos_ids: set[int], seed: int):
        self.params = params
        self.vocab_size = vocab_size
        bad = [i for i in params.banned_token_ids if i >= vocab_size]
        if bad:
            raise GPTQBridgeError(
                f"banned_token_ids: {bad[0]} is not a token id of this model (its vocabulary has {vocab_size} tokens)"
            )
        banned = set(params.banned_token_ids)
        if params.ban_eos:
            banned |= {i for i in eos_ids if i < vocab_size}
        self.banned = torch.tensor(sorted(banned), dtype=torch.long)
        if len(banned) >= vocab_size:
            raise GPTQBridgeError("banned_token_ids (with ban_eos) ban every token of the vocabulary")
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._banned_on: dict[torch.device, torch.Tensor] = {}

    @property
    def needs_context(self) -> bool:
        """Whether the tokens so far change the distribution (penalties): then the last one must be known."""
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def banned_on(self, device: torch.device) -> torch.Tensor:
        """The banned token ids on `device`, copied there once."""
        ids = self._banned_on.get(device)
        if ids is None:
            ids = self._banned_on[device] = to_device(self.banned, torch.long, device)
        return ids

    def process(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Logits after penalties and bans (before temperature)."""
        logits = apply_penalties(logits.float(), context, self.params)
        if self.banned.numel():
            logits = logits.index_fill(0, self.banned_on(logits.device), NEG_INF)
        return logits

    def distribution(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The probabilities the next token is drawn from (one-hot when greedy)."""
        logits = self.process(logits, context)
        p = self.params
        if p.temperature == 0.0:
            return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
        logits = logits / p.temperature
        logits = top_k_filter(logits, p.top_k)
        logits = top_p_filter(logits, p.top_p)
        logits = typical_filter(logits, p.typical_p)
        logits = min_p_filter(logits, p.min_p)
        return torch.softmax(logits, dim=-1)

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> int:
        return sample_batch(logits[None], [self], [context])[0]


def sample_batch(logits: torch.Tensor, samplers: list[Sampler], contexts: list[torch.Tensor]) -> list[int]:
    """The next token of each row of `logits` ([rows, vocab]), each with its own sampler and context: the
    token ids of `draw_batch`, read back once."""
    return draw_batch(logits, samplers, contexts).tolist()


def draw_batch(logits: torch.Tensor, samplers: list[Sampler], contexts: list[torch.Tensor]) -> torch.Tensor:
    """The next token ids ([rows], on the logits' device), each row with its own sampler and context.

    The same as each row's `Sampler.distribution` followed by a draw, computed for the batch at once on the
    logits' device: penalties and bans per row, then temperature, top_k, top_p and min_p on rows sorted once
    (typical_p, which ranks tokens differently, takes its row's own path). Nothing waits on the device."""
    x = torch.stack([s.process(logits[r], contexts[r]) for r, s in enumerate(samplers)])
    params = [s.params for s in samplers]
    drawn = [p.temperature != 0.0 for p in params]
    if not any(drawn):
        return x.argmax(dim=-1)
    # one uniform number per drawn row, from the row's own generator (greedy rows draw none)
    u = torch.tensor([float(torch.rand((), generator=s.generator)) if d else 0.0 for s, d in zip(samplers, drawn)])
    dev, vocab = x.device, x.shape[-1]
    column = lambda values: to_device(values, torch.float32, dev)[:, None]  # noqa: E731
    greedy = to_device([not d for d in drawn], torch.bool, dev)
    scaled = x / column([p.temperature or 1.0 for p in params])
    sx, order = torch.sort(scaled, dim=-1, descending=True)
    k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, dev)
    sx = sx.masked_fill(sx < sx.gather(1, (k - 1)[:, None]), NEG_INF)  # ties with the k-th are kept
    top_p = column([p.top_p for p in params])
    probs = torch.softmax(sx, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs >= top_p) & (top_p < 1.0)
    drop[:, 0] = False
    sx = sx.masked_fill(drop, NEG_INF)
    min_p = column([p.min_p for p in params])
    probs = torch.softmax(sx, dim=-1)
    sx = sx.masked_fill((probs < min_p * probs[:, :1]) & (min_p > 0.0), NEG_INF)
    probs = torch.softmax(sx, dim=-1)
    for r, p in enumerate(params):  # typical_p: this row's own distribution, laid out in the sorted order
        if drawn[r] and p.typical_p < 1.0:
            probs[r] = samplers[r].distribution(logits[r], contexts[r])[order[r]]
    cdf = torch.cumsum(probs, dim=-1)
    point = to_device(u, torch.float32, dev)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, point, right=True).clamp_(max=vocab - 1)
    return torch.where(greedy, x.argmax(dim=-1), order.gather(1, index)[:, 0])
