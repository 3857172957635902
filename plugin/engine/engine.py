"""The decode engine: one worker thread per model that runs the scheduler's steps and hands out tokens.

Callers in any thread `submit` a `Sequence` and read its tokens from its `deliver` callback. The worker
starts with the first request and stops after a short idle time, so an unused model holds no thread.

A step's tokens reach their callers after the next decode step is launched: waking the callers (and their
Python work on each token) then overlaps the GPU's work instead of delaying the launch.
"""

from __future__ import annotations

import threading

import torch

from ..sampling import sample_batch
from .forward import LlamaFamilyForward
from .scheduler import End, Scheduler, Sequence

IDLE_SECONDS = 2.0  # the worker exits after this long without work; the next request starts it again


class Engine:
    def __init__(
        self,
        forward: LlamaFamilyForward,
        max_batch: int = 32,
        prefill_chunk: int = 512,
        prefill_alone: int = 2048,
        graphs: bool = True,
    ):
        self.forward = forward
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
            logits = self.decode(step.decode)  # launched; the device works while the callers get their tokens
            self._flush()
            for seq in step.decode:
                seq.cached += 1
            self.steps += 1
            if all(s.greedy for s in step.decode):
                tokens = greedy_tokens(logits, step.decode)
            elif all(s.sampler is not None for s in step.decode):
                contexts = [s.context[: s.length] for s in step.decode]
                tokens = sample_batch(logits, [s.sampler for s in step.decode], contexts)
            else:
                tokens = [s.sample(row, s) for s, row in zip(step.decode, logits)]
            for seq, token in zip(step.decode, tokens):
                self._emit(seq, token)
        if not any(s.prefilled for s in self.scheduler.running):  # no decode step comes next to flush behind
            self._flush()

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


def greedy_tokens(logits: torch.Tensor, batch: list[Sequence]) -> list[int]:
    """The argmax of every row after its bans, with one read back from the device for the whole batch."""
    rows = [r for r, s in enumerate(batch) for _ in s.banned]
    if rows:
        cols = [t for s in batch for t in s.banned]
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits = logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))
    return logits.argmax(dim=-1).tolist()
