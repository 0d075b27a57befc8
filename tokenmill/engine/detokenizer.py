"""Incremental detokenization with stop strings that are never emitted.

Decoding a growing window of ids (not one token at a time) keeps multi-byte characters and
word-boundary spaces right; a window ending in U+FFFD waits for the next token. While a request
runs, the last (longest stop string - 1) characters are held back, because they could be the
start of a stop string split across tokens. What is shown is cut at a token boundary
(`visible`), so shown text and shown tokens always belong together.
"""

from __future__ import annotations

from bisect import bisect_right

from tokenmill.models.tokenizer import Tokenizer

PROMPT_CONTEXT = 6  # prompt tokens decoded with the output, for leading-space handling


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.skip = skip_special_tokens
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.finished = False
        self.num_tokens = 0  # output tokens added
        self.token_ends: list[int] = []  # per committed output token: where its text ends

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string if the text now contains one (text cut)."""
        self.ids.append(token_id)
        self.num_tokens += 1
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        old_len = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.token_ends.extend([len(self.text)] * (self.num_tokens - len(self.token_ends)))
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> str | None:
        if not self.stop:
            return None
        search_from = max(old_len - self.holdback, 0)
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
        self.finished = True
        return s

    def visible(self, finished: bool) -> tuple[str, int]:
        """(text, number of output tokens) safe to show: all of it once finished; else the
        tokens whose text is complete and ends before the held-back tail, and their text."""
        if finished or self.finished:
            return self.text, self.num_tokens
        k = bisect_right(self.token_ends, len(self.text) - self.holdback)
        return (self.text[: self.token_ends[k - 1]] if k else ""), k
