"""Scheduler: continuous batching by tokens under a budget, with chunked prefill and preemption.

Each step hands out `num_new_tokens` per request: running requests first (decodes and the rest of
chunked prompts), oldest first; then waiting requests in arrival order (FCFS), each starting
after its longest cached prefix. A prefix found in a lower KV tier is loaded first: the request
waits in `loading` (others go on being scheduled) and rejoins the queue's head once its blocks
are in (`update` hears of it). When the KV blocks run out, the newest running request is
preempted (its blocks freed, its tokens recomputed later) instead of failing.
Its output is a value (`SchedulerOutput`): a request new to the workers is sent whole once, then
only per-step deltas (tokens to feed, changed blocks, finished and preempted ids).
It does not run the model or look at text: stop strings are the front's.
Pure Python; no torch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from tokenmill.config import SchedulerConfig
from tokenmill.engine.messages import (
    CachedRequestData,
    NewRequestData,
    RunnerOutput,
    SchedulerOutput,
)
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.kv.manager import KVCacheManager


@dataclass
class _WorkerView:
    """What the workers were last told of a request: the base of the next delta."""

    num_token_ids: int  # token ids sent so far
    block_ids: list[int]  # the block table as sent


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens "
                f"({config.max_num_batched_tokens}) must be >= max_model_len ({max_model_len}); "
                "raise it, lower max_model_len or enable chunked prefill"
            )
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self._views: dict[str, _WorkerView] = {}  # requests the workers hold state for
        self._finished_ids: list[str] = []  # ended since the last output: workers forget them
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, Request] = {}  # waiting for tier loads; they hold their blocks
        self._loaded: set[str] = set()  # back in `waiting` with their prefix in the pool
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- admission and removal -----------------------------------------------------------
    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_forked(self, request: Request) -> None:
        """Track a child that the parent will fork; it is not waiting for admission."""
        self.requests[request.request_id] = request

    def finish(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests (abort, error, stop string): blocks freed at once. Unknown ids ignored."""
        done = []
        for request_id in request_ids:
            req = self.requests.pop(request_id, None)
            if req is None:
                continue
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self.loading.pop(request_id, None)
            self._loaded.discard(request_id)
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        req.times.finished = time.monotonic()
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)
        self._views.pop(req.request_id, None)
        self._finished_ids.append(req.request_id)
        for child in req.fork_children:  # never forked: they end with their parent
            self._finish(child, status)
        req.fork_children = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.loading)

    @property
    def num_loading(self) -> int:
        return len(self.loading)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []
        index = 0
        while index < len(self.running) and budget > 0:
            req = self.running[index]
            num_new = self._until_fork(req, min(req.num_tokens - req.num_computed_tokens, budget))
            while not self.kv.allocate_slots(
                req.request_id, req.all_token_ids, req.num_computed_tokens, num_new
            ):
                if self._release_loaded():
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new))
                budget -= num_new
                index += 1
                continue
            break
        if not preempted:
            self._admit_waiting(budget, scheduled)
        return self._output(scheduled, preempted)

    def _output(
        self, scheduled: list[tuple[Request, int]], preempted: list[str]
    ) -> SchedulerOutput:
        new: list[NewRequestData] = []
        cached: list[CachedRequestData] = []
        for req, _ in scheduled:
            table = self.kv.block_tables[req.request_id]
            view = self._views.get(req.request_id)
            if view is None:
                new.append(self._new_data(req, table))
                self._views[req.request_id] = _WorkerView(req.num_tokens, list(table))
            else:
                cached.append(self._delta(req, table, view))
        finished, self._finished_ids = tuple(self._finished_ids), []
        return SchedulerOutput(
            num_scheduled_tokens={req.request_id: n for req, n in scheduled},
            new_requests=tuple(new),
            cached_requests=tuple(cached),
            block_copies=tuple(self.kv.take_copies()),
            state_copies=tuple(self.kv.take_state_copies()),
            finished_request_ids=finished,
            preempted_request_ids=tuple(preempted),
            tier_ops=self.kv.take_tier_ops(),
        )

    def _new_data(self, req: Request, table: list[int]) -> NewRequestData:
        return NewRequestData(
            request_id=req.request_id,
            token_ids=tuple(req.all_token_ids),
            num_prompt_tokens=req.num_prompt_tokens,
            params=req.params,
            block_ids=tuple(table),
            num_computed_tokens=req.num_computed_tokens,
            num_prompt_logprobs=len(req.prompt_logprobs),
            state_slot=self.kv.state_slot(req.request_id),
        )

    def _delta(self, req: Request, table: list[int], view: _WorkerView) -> CachedRequestData:
        # Blocks before the one being written are immutable for a running request; only the
        # write block (copy-on-write) and the tail can differ from what the workers hold.
        start = min(len(view.block_ids), req.num_computed_tokens // self.kv.block_size)
        while start < len(view.block_ids) and view.block_ids[start] == table[start]:
            start += 1
        new_tokens = tuple(req.all_token_ids[view.num_token_ids :])
        view.num_token_ids = req.num_tokens
        view.block_ids[start:] = table[start:]
        return CachedRequestData(
            request_id=req.request_id,
            new_token_ids=new_tokens,
            block_table_start=start,
            new_block_ids=tuple(table[start:]),
            num_computed_tokens=req.num_computed_tokens,
        )

    def _admit_waiting(self, budget: int, scheduled: list[tuple[Request, int]]) -> int:
        limit = self.config.max_num_seqs
        while self.waiting and budget > 0 and len(self.running) + len(self.loading) < limit:
            req = self.waiting[0]
            hits, num_cached = self._prefix(req)
            if req.request_id in self.loading:
                self.waiting.popleft()
                continue
            num_new = req.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = self._until_fork(req, min(num_new, budget))
            if not self.kv.allocate_slots(
                req.request_id, req.all_token_ids, num_cached, num_new, hits
            ):
                if self._release_loaded(keep=req):
                    continue
                break
            self.waiting.popleft()
            self._loaded.discard(req.request_id)
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
                req.times.first_scheduled = time.monotonic()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            self.running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new
        return budget

    def _prefix(self, req: Request) -> tuple[list[int], int]:
        """The cached prefix a request starts after: (blocks to adopt, tokens). A request whose
        prefix has to come back from a tier joins `loading` instead."""
        if req.request_id in self._loaded:  # its table holds the prefix already
            return [], req.num_computed_tokens
        # prompt logprobs and mean pooling need every prompt position computed
        if (req.params.prompt_logprobs is not None and not req.prompt_logprobs) or (
            req.params.pooling == "mean"
        ):
            return [], 0
        hits, num_cached, is_loading = self.kv.find_prefix(req.request_id, req.all_token_ids)
        if is_loading:
            self.loading[req.request_id] = req
        return hits, num_cached

    def _until_fork(self, req: Request, num_new: int) -> int:
        """A state-space model's n > 1 parent stops one token short of its prompt's end: its
        children fork there with a copy of its state, and each computes the last token."""
        if not (req.fork_children and self.kv.num_state_slots):
            return num_new
        return min(num_new, max(req.num_prompt_tokens - 1 - req.num_computed_tokens, 1))

    def _release_loaded(self, keep: Request | None = None) -> bool:
        """Blocks run short: loaded requests still waiting give theirs back. The blocks stay
        in the prefix cache, so each finds its prefix again when its turn comes; holding them
        could leave the queue's head (or running requests) waiting on requests behind it."""
        released = False
        for req in self.waiting:
            if req is not keep and req.request_id in self._loaded:
                self._loaded.discard(req.request_id)
                self.kv.free(req.request_id)
                req.num_computed_tokens = 0
                released = True
        return released

    def _loads_done(self, result: RunnerOutput) -> None:
        """Requests whose tier loads are in rejoin the head of the queue, oldest first."""
        if not (result.loads_done or result.stores_failed):
            return
        ready = self.kv.finish_loads(result.loads_done, result.loads_failed, result.stores_failed)
        back = []
        for request_id, num_tokens in ready:
            req = self.loading.pop(request_id, None)
            if req is None:
                continue  # aborted while loading: the jobs freed what they held
            req.num_computed_tokens = num_tokens
            self._loaded.add(request_id)
            back.append(req)
        for req in sorted(back, key=lambda r: r.times.arrival, reverse=True):
            self.waiting.appendleft(req)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        self._views.pop(req.request_id, None)  # it returns to the workers as a new request
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- after the model ran -------------------------------------------------------------
    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Advance computed tokens, append sampled ones, fork n > 1 children, end finished ones.

        Returns the requests that got a token (finished ones included), in batch order.
        """
        now = time.monotonic()
        self._loads_done(result)
        changed: list[Request] = []
        computed = {d.request_id: d.num_computed_tokens for d in out.new_requests}
        computed.update((d.request_id, d.num_computed_tokens) for d in out.cached_requests)
        for request_id, num_new in out.num_scheduled_tokens.items():
            req = self.requests.get(request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens = computed[request_id] + num_new
            if req.fork_children and self.kv.num_state_slots and req.num_computed_tokens == req.num_prompt_tokens - 1:  # fmt: skip
                self._fork_children(req, req.num_prompt_tokens - 1)
            if request_id in result.prompt_logprobs:
                req.prompt_logprobs.extend(result.prompt_logprobs[request_id])
                req.prompt_ranks.extend(result.prompt_ranks.get(request_id, ()))
            if request_id in result.pooled:
                req.pooled = result.pooled[request_id]
            sampled = result.sampled.get(request_id)
            if sampled is None:
                continue
            req.append_token(sampled.token_id, now)
            if sampled.logprobs is not None:
                req.logprobs.append(sampled.logprobs)
            if req.fork_children:
                self._fork_children(req)
            status = req.check_token_stop()
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
            changed.append(req)
        return changed

    def _fork_children(self, parent: Request, num_shared: int | None = None) -> None:
        """Children share the parent's prompt blocks and recompute only its last prompt token,
        which gives each its own first-token logits (and copy-on-write of the shared block).
        A state-space model's children fork before that token (`num_shared`), each with a
        copy of the parent's state; one that finds no free state slot computes its prompt
        alone, as a request of its own."""
        num_prompt = parent.num_prompt_tokens
        for child in parent.fork_children:
            if child.is_finished:
                continue
            if not self.kv.fork(parent.request_id, child.request_id, num_shared or num_prompt):
                self.waiting.append(child)
                continue
            child.num_computed_tokens = num_prompt - 1
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RequestStatus.RUNNING
            child.times.first_scheduled = now = time.monotonic()
            child.times.arrival = min(child.times.arrival, now)
            child.prompt_logprobs = parent.prompt_logprobs
            child.prompt_ranks = parent.prompt_ranks
            self.running.append(child)
        parent.fork_children = []
