"""Stop strings over streamed text, with hold-back.

Text arrives in pieces (one per token, or fewer). A stop string may span several pieces, so the tail of the
text that could still grow into a stop string is held back until the next pieces decide it: either the stop
string completes (the held text is dropped, generation ends) or it cannot anymore (the held text is released).
No released text ever contains a stop string or the beginning of one that later completed.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str] | tuple[str, ...]):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(dict.fromkeys(stops))
        self.pending = ""  # text received but not released
        self.stopped: str | None = None  # the stop string that fired

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def feed(self, text: str) -> str:
        """Add a piece of text; return what can be released now ("" when everything is held or after a stop)."""
        if self.stopped is not None:
            return ""
        self.pending += text
        hit = None
        for stop in self.stops:
            i = self.pending.find(stop)
            # the earliest stop wins; at the same place, the longer one
            if i >= 0 and (hit is None or i < hit[0] or (i == hit[0] and len(stop) > len(hit[1]))):
                hit = (i, stop)
        if hit is not None:
            released = self.pending[: hit[0]]
            self.pending = ""
            self.stopped = hit[1]
            return released
        keep = self._held_length(self.pending)
        released = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return released

    def flush(self) -> str:
        """Generation ended for another reason: what was held is not a stop string, release it."""
        released, self.pending = ("" if self.stopped else self.pending), ""
        return released
