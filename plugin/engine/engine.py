"""The decode engine: one worker thread per model that runs the scheduler's steps and hands out tokens.

Callers in any thread `submit` a `Sequence` and read its tokens from its `deliver` callback. The worker
starts with the first request and stops after a short idle time, so an unused model holds no thread.

On a GPU the host stays one step ahead of the device. A decode step's tokens are drawn on the device and
fed to the next step there; the host launches that next step before it reads them, then hands them out while
the device computes. So the device never idles while the host reads tokens, checks stops and builds the next
step's inputs. A request whose last token ends it (end of sequence) has one more row computed, which is
dropped; a request at its token limit is not scheduled past it. Rows whose sampling depends on the tokens so
far (repetition, presence and frequency penalties) wait for their last token to be read first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..sampling import draw_batch
from ..transfer import to_device
from .forward import Feed, LlamaFamilyForward
from .scheduler import End, Scheduler, Sequence

IDLE_SECONDS = 2.0  # the worker exits after this long without work; the next request starts it again


@dataclass
class _InFlight:
    """A launched decode step whose tokens the host has not read yet."""

    batch: list[Sequence]
    tokens: torch.Tensor  # the step's token ids, on the device (what the next step is fed)
    host: torch.Tensor  # their copy on the host, filled when `ready` has passed
    ready: torch.cuda.Event | None


class Engine:
    def __init__(
        self,
        forward: LlamaFamilyForward,
        max_batch: int = 32,
        prefill_chunk: int = 512,
        prefill_alone: int = 2048,
        graphs: bool = True,
        overlap: bool | None = None,
    ):
        self.forward = forward
        # launch each decode step before reading the last one's tokens (None: on a GPU)
        self.overlap = forward.device.type == "cuda" if overlap is None else overlap
        self._inflight: _InFlight | None = None
        self._ban_ids: dict[tuple[int, ...], torch.Tensor] = {}  # ban lists on the logits' device
        self.decode = forward.decode
        self.first_chunk = None
        if graphs and forward.device.type == "cuda":
            from .graphs import GraphedDecode, GraphedPrefill

            self.decode = GraphedDecode(forward, max_batch)
            self.decode.capture_all()  # once, at the first request: no capture pauses a running batch later
            self.first_chunk = GraphedPrefill(forward, pool=self.decode.pool)
            self.first_chunk.capture_all()
        self.scheduler = Scheduler(forward.cache.allocator, max_batch, prefill_chunk, prefill_alone)
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and stats)
        self.fed = 0  # rows whose input token was fed on the device, unread by the host (overlap at work)
        self._outbox: list[tuple[Sequence, object]] = []  # (request, token or End) not yet delivered, in order

    def submit(self, seq: Sequence) -> None:
        """Queue a request (raises CacheBudgetError at once if it could never fit) and make sure a worker runs."""
        self.scheduler.submit(seq)
        with self._wake:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="gptq-bridge-engine", daemon=True)
                self._worker.start()
            self._wake.notify()

    def close(self) -> None:
        """End every request (as cancelled) and stop the worker; the engine can be used again afterwards."""
        seqs = self.scheduler.fail_all()
        with self._wake:
            worker, self._worker = self._worker, None
            self._wake.notify()
        if worker is not None and worker is not threading.current_thread():
            worker.join()  # it delivers what it holds before it exits
        for seq in seqs:
            seq.deliver(End("cancelled"))

    def wake(self) -> None:
        """Called after a cancel, so an idle-waiting worker notices it now."""
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._wake:
                if not self._wake.wait_for(lambda: self._worker is not me or self.scheduler.pending(), IDLE_SECONDS):
                    self._worker = None  # idle: the next submit starts a new worker
                    return
                if self._worker is not me:  # closed
                    self._flush()
                    return
            try:
                self._step()
            except BaseException as exc:  # noqa: BLE001 - every request in flight must hear of it
                for seq in self.scheduler.fail_all():
                    self._outbox.append((seq, End("error", exc)))
                self._flush()

    def _step(self) -> None:
        step, cancelled = self.scheduler.plan()
        for seq in cancelled:
            self._outbox.append((seq, End("cancelled")))
        for seq in step.admitted:
            self.forward.clear(seq.blocks)
        if step.prefill:
            self._flush()  # the running streams' tokens do not wait for a prompt chunk
            if len(step.prefill) == 1 and self.first_chunk is not None and self.first_chunk.serves(*step.prefill[0]):
                seq, _, end = step.prefill[0]
                logits = self.first_chunk(seq, end)[None]
            else:
                logits = self.forward.prefill_many(step.prefill)
            for (seq, _, end), row in zip(step.prefill, logits):
                seq.cached = end
                if seq.prefilled:
                    self._emit(seq, seq.sample(row, seq))
        if step.decode:
            batch = step.decode
            if not self.overlap or any(s.sampler is None or s.sampler.needs_context for s in batch):
                self._land()  # these rows need every token so far on the host
            logits = self.decode(batch, self._feed(batch))  # launched: the device works while the host goes on
            for seq in batch:
                seq.cached += 1
                seq.pending += 1
            self.steps += 1
            tokens = self._draw(logits, batch)
            previous, self._inflight = self._inflight, self._read_back(batch, tokens)
            if previous is not None:
                self._hand_out(previous)
            if not self.overlap:
                self._land()
            self._flush()
        else:
            self._land()
        if not any(s.prefilled for s in self.scheduler.running):  # no decode step comes next to flush behind
            self._land()
            self._flush()

    def _feed(self, batch: list[Sequence]) -> Feed | None:
        """The rows whose input token is the in-flight step's, still on the device."""
        inflight = self._inflight
        if inflight is None:
            return None
        where = {id(s): r for r, s in enumerate(inflight.batch)}
        rows = [r for r, s in enumerate(batch) if s.pending]
        if not rows:
            return None
        self.fed += len(rows)
        return Feed(rows, [where[id(batch[r])] for r in rows], inflight.tokens)

    def _draw(self, logits: torch.Tensor, batch: list[Sequence]) -> torch.Tensor:
        """Each row's next token id, on the device, nothing read back."""
        if all(s.greedy for s in batch):
            if len(self._ban_ids) > 64:  # ban lists seen (one per model mostly); kept on the device
                self._ban_ids.clear()
            return greedy_draw(logits, batch, self._ban_ids)
        if all(s.sampler is not None for s in batch):
            return draw_batch(logits, [s.sampler for s in batch], [s.context[: s.length] for s in batch])
        return torch.tensor([s.sample(row, s) for s, row in zip(batch, logits)], device=logits.device)

    def _read_back(self, batch: list[Sequence], tokens: torch.Tensor) -> _InFlight:
        if tokens.device.type != "cuda":
            return _InFlight(batch, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tokens.device))
        return _InFlight(batch, tokens, host, ready)

    def _land(self) -> None:
        """Read the tokens of the step in flight, if any, and hand them out."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self._hand_out(inflight)

    def _hand_out(self, inflight: _InFlight) -> None:
        """Wait for a launched step's tokens to reach the host and pass each to its request."""
        if inflight.ready is not None:
            inflight.ready.synchronize()
        for seq, token in zip(inflight.batch, inflight.host.tolist()):
            seq.pending -= 1
            if seq.finish_reason is None:  # not ended (end of sequence, cancel) while this step ran
                self._emit(seq, token)

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.append(token)
        self._outbox.append((seq, token))
        if token in seq.end_ids:
            reason = "eos"
        elif seq.generated >= seq.max_new_tokens:
            reason = "length"
        else:
            return
        self.scheduler.finish(seq, reason)
        self._outbox.append((seq, End(reason)))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for seq, item in outbox:
            seq.deliver(item)


def greedy_draw(logits: torch.Tensor, batch: list[Sequence], ban_ids: dict | None = None) -> torch.Tensor:
    """The argmax of every row after its bans, on the device. `ban_ids` keeps ban lists already on the device."""
    bans = {tuple(s.banned) for s in batch}
    if len(bans) == 1:  # every row bans the same tokens (end of sequence, say): one fill, the ids copied once
        (banned,) = bans
        if banned:
            ids = None if ban_ids is None else ban_ids.get(banned)
            if ids is None:
                ids = to_device(list(banned), torch.long, logits.device)
                if ban_ids is not None:
                    ban_ids[banned] = ids
            logits = logits.index_fill(1, ids, float("-inf"))
        return logits.argmax(dim=-1)
    rows = [r for r, s in enumerate(batch) for _ in s.banned]
    if rows:
        cols = [t for s in batch for t in s.banned]
        dev = logits.device
        index = (to_device(rows, torch.long, dev), to_device(cols, torch.long, dev))
        logits = logits.index_put(index, logits.new_full((), float("-inf")))
    return logits.argmax(dim=-1)
