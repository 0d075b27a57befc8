"""LLMEngine: the step loop. `step()` = schedule -> execute -> update, then outputs.

It owns the scheduler (which owns the KV manager) and the model runner, turns prompts into
requests (n > 1 becomes n sibling requests that share the prompt's blocks), detokenizes, applies
stop strings, and reports `RequestOutput`s. A failed model step ends the requests of that step
with finish_reason "error"; the engine stays usable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.runner import ModelRunner, default_kv_cache_memory, kv_bytes_per_token
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kv.manager import KVCacheManager
from tokenmill.models.loader import LoadedModel, load_model
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


@dataclass
class _Group:
    """One user request: n sibling sequences, their detokenizers, the prompt."""

    request_id: str
    prompt: str | None
    children: list[Request]
    detoks: list[IncrementalDetokenizer]


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_blocks: int
    kv_usage: float  # fraction of blocks in use
    prefix_cache_hit_rate: float  # of blocks looked up
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        m = config.model
        self.loaded = loaded or load_model(
            m.model, m.dtype, config.device.device, m.max_model_len, config.quant
        )
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = self.loaded.max_model_len
        sched = replace(config.scheduler, max_model_len=self.max_model_len)
        self.config = replace(config, scheduler=sched)
        cache = config.cache
        memory = cache.kv_cache_memory or default_kv_cache_memory(
            self.loaded, cache, sched.max_num_seqs * self.max_model_len
        )
        per_block = kv_bytes_per_token(self.loaded, cache.kv_cache_dtype) * cache.block_size
        num_blocks = memory // per_block
        needed = -(-self.max_model_len // cache.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"kv_cache_memory of {memory / 2**20:.1f} MiB holds {num_blocks} blocks, but one "
                f"sequence of max_model_len={self.max_model_len} needs {needed}; raise "
                f"kv_cache_memory to at least {needed * per_block} bytes or lower max_model_len"
            )
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched, self.kv)
        self.runner = ModelRunner(
            self.loaded,
            cache,
            num_blocks,
            config.model.seed,
            config.device.num_threads,
            config.device.cpu_kernels,
        )
        self.groups: dict[str, _Group] = {}
        self._child_group: dict[str, str] = {}
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d",
            num_blocks,
            cache.block_size,
            num_blocks * per_block / 2**20,
            self.max_model_len,
        )
        if config.device.compile:
            self.runner.compile_model()
            self._warm_up()

    def _warm_up(self) -> None:
        """Step through each shape class once (a prefill, a decode of several rows, a decode of
        one), so that compiled graphs are built at start-up rather than in a request's time."""
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        started = time.monotonic()
        for batch in (2, 1):
            for i in range(batch):
                ids = [(i + j) % self.loaded.arch.vocab_size for j in range(1, 6)]
                self.add_request(f"warm-up-{batch}-{i}", ids, params)
            while self.has_unfinished():
                self.step()
        log.info("warm-up (graph compilation) took %.1f s", time.monotonic() - started)

    # ---- requests in -----------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self.tokenize(prompt["prompt"])
        return None, list(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival: float | None = None,
    ) -> None:
        """Validate and queue a request; raises ValueError (naming the field) for bad input."""
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        self._validate(ids if text != "" else [], params)
        arrival = time.monotonic() if arrival is None else arrival
        children = []
        for i in range(params.n):
            child_params = params if params.n == 1 else params.for_child(i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(
                Request(
                    child_id,
                    ids,
                    child_params,
                    self.loaded.eos_token_ids,
                    self.max_model_len,
                    arrival,
                )
            )
            self._child_group[child_id] = request_id
        detoks = [
            IncrementalDetokenizer(
                self.tokenizer,
                ids,
                params.stop_strings,
                params.skip_special_tokens,
                params.include_stop_str_in_output,
            )
            for _ in children
        ]
        self.groups[request_id] = _Group(request_id, text, children, detoks)
        first, rest = children[0], children[1:]
        first.fork_children = rest
        for child in rest:
            self.scheduler.add_forked(child)
        self.scheduler.add(first)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.loaded.arch.vocab_size
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}; "
                "it must be shorter (context_length_exceeded)"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len}); lower max_tokens (context_length_exceeded)"
            )
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """End requests now, freeing their blocks; returns their final outputs."""
        return self._end_groups(request_ids, RequestStatus.FINISHED_ABORTED)

    def _end_groups(self, group_ids: list[str], status: RequestStatus) -> list[RequestOutput]:
        outs = []
        for gid in group_ids:
            group = self.groups.get(gid)
            if group is None:
                continue
            self.scheduler.finish([c.request_id for c in group.children], status)
            outs.append(self._output(group))
        return outs

    # ---- the step --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        try:
            result = self.runner.execute(out)
        except Exception:
            log.exception("model step failed; ending the %d requests in it", len(out.scheduled))
            groups = {self._child_group[s.request.request_id] for s in out.scheduled}
            return self._end_groups(sorted(groups), RequestStatus.FINISHED_ERROR)
        changed = self.scheduler.update(out, result)
        return self._process(changed)

    def _process(self, changed: list[Request]) -> list[RequestOutput]:
        touched: dict[str, _Group] = {}
        for req in changed:
            gid = self._child_group[req.request_id]
            group = self.groups[gid]
            index = group.children.index(req) if len(group.children) > 1 else 0
            stop = group.detoks[index].add(req.output_token_ids[-1])
            if stop is not None and not req.is_finished:
                req.stop_reason = stop
                self.scheduler.finish([req.request_id], RequestStatus.FINISHED_STOPPED)
            elif stop is not None:
                req.stop_reason = stop
                req.status = RequestStatus.FINISHED_STOPPED
            touched[gid] = group
        return [self._output(g) for g in touched.values()]

    def _output(self, group: _Group) -> RequestOutput:
        outputs = []
        for i, (req, detok) in enumerate(zip(group.children, group.detoks)):
            lps = req.logprobs if req.params.logprobs is not None else None
            cumulative = sum(lp[t] for lp, t in zip(lps, req.output_token_ids)) if lps else None
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=detok.visible_text(req.is_finished),
                    token_ids=req.output_token_ids,
                    cumulative_logprob=cumulative,
                    logprobs=lps,
                    finish_reason=req.status.finish_reason,
                    stop_reason=req.stop_reason,
                )
            )
        finished = all(r.is_finished for r in group.children)
        first = group.children[0]
        if finished:
            self._forget(group)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs
            if first.params.prompt_logprobs is not None
            else None,
            outputs=outputs,
            finished=finished,
            metrics=RequestMetrics.of(first),
            num_cached_tokens=first.num_cached_tokens,
            child_metrics=[RequestMetrics.of(r) for r in group.children],
        )

    def _forget(self, group: _Group) -> None:
        self.groups.pop(group.request_id, None)
        ids = [c.request_id for c in group.children]
        for child_id in ids:
            self._child_group.pop(child_id, None)
        self.runner.release(ids)

    # ---- state -----------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def stats(self) -> EngineStats:
        pool = self.kv.pool
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_used_blocks=pool.num_used_blocks,
            num_blocks=pool.num_blocks,
            kv_usage=pool.usage,
            prefix_cache_hit_rate=pool.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
        )
