"""Generated token ids in, chunks of text and the final result out: one request's side of any generator.

For each token: a special stop token or EOS ends the reply; otherwise its text (whole UTF-8 characters only)
goes through the stop-string matcher, which holds back what could still become a stop string. At the end,
whatever is still held is released (or completes a stop string). Both the eager generator and the decode
engine feed tokens through this, so they end and stream text in exactly the same way.
"""

from __future__ import annotations

from .stopping import StopMatcher
from .types import GenerationChunk, GenerationResult, Usage


class Reply:
    def __init__(self, decoder, stops: list[str], stop_token_ids: dict[int, str], eos_ids: set[int]):
        self.decoder = decoder  # an IncrementalDecoder
        self.matcher = StopMatcher(stops)
        self.stop_token_ids = stop_token_ids
        self.eos_ids = eos_ids
        self.text = ""
        self.token_ids: list[int] = []
        self._unreported: list[int] = []
        self.finish: str | None = None  # set once the reply has ended
        self.stop_string: str | None = None

    def _chunk(self, text: str) -> GenerationChunk:
        self.text += text
        chunk = GenerationChunk(text=text, full_text=self.text, token_ids=self._unreported)
        self._unreported = []
        return chunk

    def add(self, token: int) -> GenerationChunk | None:
        """One new token; the text it releases, if any. Afterwards `finish` is set if the reply has ended."""
        self.token_ids.append(token)
        self._unreported.append(token)
        if token in self.stop_token_ids:
            self.finish, self.stop_string = "stop", self.stop_token_ids[token]
            return None
        if token in self.eos_ids:
            self.finish = "eos"
            return None
        out = self.matcher.feed(self.decoder.add(token))
        if self.matcher.stopped is not None:
            self.finish, self.stop_string = "stop", self.matcher.stopped
        return self._chunk(out) if out else None

    def close(self, finish: str) -> GenerationChunk | None:
        """End the reply (`finish` unless it already ended); the text still held back, if any."""
        self.finish = self.finish or finish
        if self.matcher.stopped is not None:
            return None
        tail = self.matcher.feed(self.decoder.flush())
        if self.matcher.stopped is not None:  # the last piece completed a stop string (it came before any stop token)
            self.finish, self.stop_string = "stop", self.matcher.stopped
        tail += self.matcher.flush()
        return self._chunk(tail) if tail else None

    def result(self, prompt_tokens: int, **fields) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            finish_reason=self.finish,
            stop_string=self.stop_string,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(self.token_ids)),
            token_ids=self.token_ids,
            **fields,
        )
