"""The engine core's grammar matchers: one per constrained sequence.

- Compiled off the step loop: `compile` returns a future from a worker thread (llguidance drops
  the GIL while it builds a grammar), and the core admits the request once it is done; other
  requests keep decoding meanwhile.
- Cached by spec: one pristine matcher per grammar (LRU), deep-copied per sequence, so a client
  that sends the same schema every time compiles it once.
- Per step, `bitmask(seq_ids)` fills one row of allowed tokens per constrained row that samples,
  as plain bytes the workers receive in the SchedulerOutput. Row by row in the core's thread:
  llguidance's parallel executor took 1.64 ms per step for 8 rows where this takes 0.88, and its
  idle threads kept spinning into the forward pass (a JSON-schema batch of 8: TPOT 1.14x
  unconstrained with the executor, 1.03x without; BENCHMARKS.md).
- After sampling, `accept` advances a sequence's matcher by its token. A preempted sequence keeps
  its matcher: its tokens are kept and recomputed, never re-sampled.

The tokenizer (vocabulary bytes) is built once, in the background from start-up: ~3 s for a
GGUF's tokenizer, which a structured request arriving earlier waits for.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np

from tokenmill.engine.messages import GrammarBitmask
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.structured.grammar import grammar_of

log = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(
        self,
        tokenizer_json: Callable[[], str],
        vocab_size: int,
        eos_token_ids: Iterable[int],
        cache_size: int = 256,
        num_threads: int = 2,
    ) -> None:
        self.vocab_size = vocab_size  # the logits' width: the mask covers every row entry
        self.words = (vocab_size + 31) // 32
        self._eos = sorted(eos_token_ids)
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="grammar")
        self._tokenizer: Future[llguidance.LLTokenizer] = self._pool.submit(
            self._make_tokenizer, tokenizer_json
        )
        self._cache: OrderedDict[tuple, Future[llguidance.LLMatcher]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

        self.matchers: dict[str, llguidance.LLMatcher] = {}  # sequence id -> its matcher

    def _make_tokenizer(self, tokenizer_json: Callable[[], str]) -> llguidance.LLTokenizer:
        tok = llguidance.LLTokenizer(
            tokenizer_json(), n_vocab=self.vocab_size, eos_token=self._eos or None
        )
        log.info("structured outputs: grammar tokenizer ready (%d tokens)", tok.vocab_size)
        return tok

    # ---- compilation -----------------------------------------------------------------------
    def compile(self, params: StructuredOutputsParams) -> Future[llguidance.LLMatcher]:
        """A pristine matcher for `params` (shared: copy it per sequence with `attach`)."""
        key = params.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._build, params)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return future

    def _build(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer.result(), grammar_of(params), log_level=0)
        if matcher.is_error():
            with self._lock:  # never cache a failure: the next request tries again
                self._cache.pop(params.key, None)
            raise ValueError(f"{params.source}: {matcher.get_error()}")
        return matcher

    def attach(self, seq_id: str, pristine: llguidance.LLMatcher) -> None:
        self.matchers[seq_id] = pristine.deep_copy()

    def drop(self, seq_id: str) -> None:
        self.matchers.pop(seq_id, None)

    # ---- per step --------------------------------------------------------------------------
    def bitmask(self, seq_ids: list[str]) -> GrammarBitmask:
        """Allowed tokens of each sequence's next sample, one row per id, in order."""
        mask = np.full((len(seq_ids), self.words), -1, dtype=np.int32)
        for i, seq_id in enumerate(seq_ids):  # in this thread: see the module's docstring
            self.matchers[seq_id].unsafe_compute_mask_ptr(mask[i].ctypes.data, self.words * 4)
        return GrammarBitmask(tuple(seq_ids), self.words, mask.tobytes())

    def accept(self, seq_id: str, token_id: int) -> bool:
        """Advance by a sampled token; False when the grammar refuses it (an error state)."""
        return self.matchers[seq_id].consume_token(token_id)

    def is_terminated(self, seq_id: str) -> bool:
        """The output is complete: the grammar allows nothing more (EOS at most)."""
        return self.matchers[seq_id].is_stopped()

    def error(self, seq_id: str) -> str:
        return self.matchers[seq_id].get_error()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
