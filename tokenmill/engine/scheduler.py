"""Scheduler: continuous batching by tokens under a budget, with chunked prefill and preemption.

Each step hands out `num_new_tokens` per request: running requests first (decodes and the rest of
chunked prompts), oldest first; then waiting requests in arrival order (FCFS), each starting
after its longest cached prefix. When the KV blocks run out, the newest running request is
preempted (its blocks freed, its tokens recomputed later) instead of failing.
It does not run the model or look at text: stop strings are the engine's.
Pure Python; no torch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenmill.config import SchedulerConfig
from tokenmill.engine.request import Request, RequestStatus, TokenLogprobs
from tokenmill.kv.manager import KVCacheManager


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request  # the runner reads token ids and params; only the scheduler mutates it
    num_computed_tokens: int  # tokens whose K/V is cached before this step
    num_new_tokens: int  # tokens computed this step
    block_table: list[int]  # physical blocks covering computed + new tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so a token is sampled."""
        return self.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # the runner packs them in this order
    block_copies: list[tuple[int, int]]  # (src, dst) copy-on-write moves, before the forward
    num_preempted: int  # requests preempted this step (metrics)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None = None  # the chosen token and top-k, when asked for


@dataclass(frozen=True)
class RunnerOutput:
    sampled: dict[str, SampledToken]  # request id -> its new token (requests that sample)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
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
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        req.times.finished = time.monotonic()
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)
        for child in req.fork_children:  # never forked: they end with their parent
            self._finish(child, status)
        req.fork_children = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        num_preempted = 0
        index = 0
        while index < len(self.running) and budget > 0:
            req = self.running[index]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(
                req.request_id, req.all_token_ids, req.num_computed_tokens, num_new
            ):
                victim = self.running.pop()
                self._preempt(victim)
                num_preempted += 1
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, num_new))
                budget -= num_new
                index += 1
                continue
            break
        if not num_preempted:
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(scheduled, self.kv.take_copies(), num_preempted)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits: list[int] = []
            num_cached = 0
            if req.params.prompt_logprobs is None or req.prompt_logprobs:
                hits, num_cached = self.kv.get_computed_blocks(req.request_id, req.all_token_ids)
            num_new = req.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(
                req.request_id, req.all_token_ids, num_cached, num_new, hits
            ):
                break
            self.waiting.popleft()
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
                req.times.first_scheduled = time.monotonic()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            self.running.append(req)
            scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
        return budget

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        table = self.kv.block_tables[req.request_id]
        return ScheduledRequest(req, req.num_computed_tokens, num_new, table)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
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
        changed: list[Request] = []
        for item in out.scheduled:
            req = item.request
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted later in the same step cannot happen; aborted can
            req.num_computed_tokens = item.num_computed_tokens + item.num_new_tokens
            if req.request_id in result.prompt_logprobs:
                req.prompt_logprobs.extend(result.prompt_logprobs[req.request_id])
            sampled = result.sampled.get(req.request_id)
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

    def _fork_children(self, parent: Request) -> None:
        """Children share the parent's prompt blocks and recompute only its last prompt token,
        which gives each its own first-token logits (and copy-on-write of the shared block)."""
        num_prompt = parent.num_prompt_tokens
        for child in parent.fork_children:
            if child.is_finished:
                continue
            self.kv.fork(parent.request_id, child.request_id, num_prompt)
            child.num_computed_tokens = num_prompt - 1
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RequestStatus.RUNNING
            child.times.first_scheduled = now = time.monotonic()
            child.times.arrival = min(child.times.arrival, now)
            child.prompt_logprobs = parent.prompt_logprobs
            self.running.append(child)
        parent.fork_children = []
