"""EngineCore: the step loop. `step()` = schedule -> execute -> update, returning value deltas.

It owns the scheduler (which owns the KV manager) and an executor. Requests come in as
`EngineCoreRequest`s (already tokenized and validated by the front); n > 1 becomes n sequences
"{id}#{i}" that share the prompt's blocks. Each step returns `EngineCoreOutputs`: per sequence,
the tokens and logprobs it gained, and its finish reason. Text, stop strings and user-facing
outputs are the front's (engine/output_processor.py). A failed model step is rerun on parts of
its batch until the requests that break it stand alone; only those end, with finish_reason
"error", and the rest of the step stands (a dead executor ends the core instead).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, replace

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    ModelInfo,
    RequestMetrics,
    RunnerOutput,
    SchedulerOutput,
)
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.executor.base import Executor, ExecutorDeadError
from tokenmill.kv.manager import KVCacheManager
from tokenmill.kv.specs import bytes_per_state, plan_kv_cache
from tokenmill.kv.tiers import TierPolicy
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def sequence_id(request_id: str, index: int, n: int) -> str:
    """The core's id of sequence `index` of a request with n sequences."""
    return request_id if n == 1 else f"{request_id}#{index}"


def metrics_of(req: Request) -> RequestMetrics:
    t = req.times
    return RequestMetrics(
        t.arrival, t.first_scheduled, t.first_token, t.last_token, t.finished, req.num_output_tokens
    )


@dataclass
class _Sequence:
    request_id: str  # the user request
    index: int
    request: Request
    num_sent_tokens: int = 0  # output tokens already in an EngineCoreOutput
    num_sent_prompt_logprobs: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        if executor is None:
            from tokenmill.executor import executor_for

            executor = executor_for(config)
        self.executor = executor
        self.config = config
        worker = executor.describe()
        self.max_model_len = worker.max_model_len
        cache, sched = config.cache, config.scheduler
        specs = executor.cache_specs()
        state = bytes_per_state(specs)  # state-space layers: a fixed state per request
        memory = (
            cache.kv_cache_memory
            or executor.default_kv_cache_memory(sched.max_num_seqs * self.max_model_len)
            + sched.max_num_seqs * state
        )
        plan = plan_kv_cache(specs, memory, cache.block_size, self.max_model_len, sched.max_num_seqs)  # fmt: skip
        executor.initialize_cache(plan.num_blocks, plan.num_state_slots)
        prefix_caching = cache.enable_prefix_caching
        if state and prefix_caching:
            log.info("prefix caching is off: this model's state-space layers keep a state per "
                     "request, not per block")  # fmt: skip
            prefix_caching = False
        if state and cache.has_tiers:
            raise ValueError("the KV tiers hold cached prefixes, which a state-space model does not keep; drop kv_host_memory and kv_disk_dir")  # fmt: skip
        self.kv = KVCacheManager(
            plan.num_blocks, cache.block_size, prefix_caching,
            self._tiers(executor), plan.num_state_slots,
        )  # fmt: skip
        self.forks_share_prompt = not state  # False: n > 1 forks copy the parent's state
        self.scheduler = Scheduler(sched, self.kv, self.max_model_len)
        self.eos_token_ids = worker.eos_token_ids
        self.info = ModelInfo(
            vocab_size=worker.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=worker.eos_token_ids,
            device_type=worker.device_type,
            device_name=worker.device_name,
            num_blocks=plan.num_blocks,
            block_size=cache.block_size,
            kv_cache_dtype=cache.kv_cache_dtype,
            enable_prefix_caching=prefix_caching,
            max_num_seqs=config.scheduler.max_num_seqs,
        )
        self._sequences: dict[str, _Sequence] = {}  # sequence id -> its state
        self._requests: dict[str, list[str]] = {}  # request id -> its sequence ids
        self._structured = None  # StructuredOutputManager, made by the first constrained request
        self._compiling: dict[str, tuple[EngineCoreRequest, Future]] = {}  # their grammars build
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d",
            plan.num_blocks,
            cache.block_size,
            plan.num_bytes / 2**20,
            self.max_model_len,
        )
        if config.device.compile:
            self._warm_up()

    def _tiers(self, executor: Executor) -> TierPolicy | None:
        """The host and disk tiers below the pool, when asked for; a disk tier left by an
        earlier run comes back warm (the worker validated its files)."""
        cache = self.config.cache
        if not (cache.kv_host_memory or cache.kv_disk_dir):
            return None
        info = executor.initialize_tiers(cache.kv_host_memory)
        tiers = TierPolicy(info.host_blocks, info.disk_blocks, info.bytes_per_block, cache.kv_tier_policy)  # fmt: skip
        tiers.restore(info.disk_hashes, info.disk_partial)
        log.info(
            "KV tiers (%s): host %d blocks (%.1f MiB), disk %d blocks, %d restored from disk; blocks %s",
            cache.kv_tier_policy, info.host_blocks, info.host_blocks * info.bytes_per_block / 2**20,
            info.disk_blocks, len(tiers.disk.entries),
            "as the pool holds them" if cache.kv_tier_dtype == "auto"
            else f"compressed to {cache.kv_tier_dtype} ({info.bytes_per_block} bytes each)",
        )  # fmt: skip
        return tiers

    def _warm_up(self) -> None:
        """Step through each shape class once (a prefill, a decode of several rows, a decode of
        one), so that compiled graphs are built at start-up rather than in a request's time."""
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        started = time.monotonic()
        for batch in (2, 1):
            for i in range(batch):
                ids = tuple((i + j) % self.info.vocab_size for j in range(1, 6))
                self.add_request(EngineCoreRequest(f"warm-up-{batch}-{i}", ids, params, started))
            while self.has_unfinished():
                self.step()
        log.info("warm-up (graph compilation) took %.1f s", time.monotonic() - started)

    # ---- requests in -----------------------------------------------------------------------
    def add_request(self, r: EngineCoreRequest) -> None:
        """Queue a validated request (the front checked ids and lengths). A constrained one
        waits for its grammar to compile (off the step loop), then queues."""
        if r.request_id in self._requests or r.request_id in self._compiling:
            raise ValueError(f"request_id {r.request_id!r} is already in use")
        if r.params.structured_outputs is not None:
            future = self.structured.compile(r.params.structured_outputs)
            self._compiling[r.request_id] = (r, future)
            return
        self._queue(r)

    @property
    def structured(self):
        if self._structured is None:
            from tokenmill.models.loader import load_tokenizer
            from tokenmill.structured.manager import StructuredOutputManager

            model = self.config.model.model
            self._structured = StructuredOutputManager(
                lambda: load_tokenizer(model).backend.to_str(),
                self.info.vocab_size,
                self.eos_token_ids,
            )
        return self._structured

    def _admit_compiled(self) -> tuple[EngineCoreOutput, ...]:
        """Queue the constrained requests whose grammar is ready; end those whose grammar
        failed (the front validated it, so this is rare) with "error"."""
        failed: list[EngineCoreOutput] = []
        for request_id, (r, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            try:
                pristine = future.result()
            except Exception as exc:
                log.warning("request %s: grammar failed to compile: %s", request_id, exc)
                metrics = RequestMetrics(r.arrival_time, None, None, None, time.monotonic(), 0)
                failed += [
                    EngineCoreOutput(request_id, i, (), None, None, "error", str(exc), 0, metrics)
                    for i in range(r.params.n)
                ]
                continue
            self._queue(r)
            for seq_id in self._requests[request_id]:
                self.structured.attach(seq_id, pristine)
        return tuple(failed)

    def _queue(self, r: EngineCoreRequest) -> None:
        n = r.params.n
        children = []
        for i in range(n):
            params = r.params if n == 1 else r.params.for_child(i)
            seq_id = sequence_id(r.request_id, i, n)
            req = Request(
                seq_id,
                list(r.prompt_token_ids),
                params,
                self.eos_token_ids,
                self.max_model_len,
                r.arrival_time,
            )
            self._sequences[seq_id] = _Sequence(r.request_id, i, req)
            children.append(req)
        self._requests[r.request_id] = [c.request_id for c in children]
        first, rest = children[0], children[1:]
        if not self.forks_share_prompt and len(r.prompt_token_ids) < 2:  # nothing to share
            for child in children:
                self.scheduler.add(child)
            return
        first.fork_children = rest
        for child in rest:
            self.scheduler.add_forked(child)
        self.scheduler.add(first)

    def abort(self, ids: list[str] | tuple[str, ...]) -> None:
        """End requests (all their sequences) or single sequences now, freeing their blocks.
        No output is emitted: whoever aborts knows. Unknown ids are ignored."""
        seq_ids = []
        for i in ids:
            seq_ids.extend(self._requests.get(i, [i] if i in self._sequences else []))
        self.scheduler.finish(seq_ids, RequestStatus.FINISHED_ABORTED)
        for seq_id in seq_ids:
            self._forget(seq_id)
        for i in ids:
            self._compiling.pop(i, None)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        started = time.perf_counter()
        compile_failed = self._admit_compiled() if self._compiling else ()
        out = self.scheduler.schedule()
        if out.is_idle:
            if self._compiling and not compile_failed:  # only grammars to wait for
                wait_futures([f for _, f in self._compiling.values()], timeout=0.05)
            return EngineCoreOutputs(compile_failed, self.stats())
        if self._structured is not None and self._structured.matchers:
            out = self._with_bitmask(out)
        failed: tuple[EngineCoreOutput, ...] = compile_failed
        try:
            result = self.executor.execute(out)
        except ExecutorDeadError:
            raise  # nothing to isolate: the core cannot go on
        except Exception as exc:
            result, culprits = self._isolate(list(out.num_scheduled_tokens), exc)
            failed += self._fail(culprits)
        changed = self.scheduler.update(out, result)
        if out.grammar_bitmask is not None:
            self._advance_grammars(changed)
        outputs = failed + tuple(self._output(req) for req in changed)
        return EngineCoreOutputs(
            outputs, self.stats(), time.perf_counter() - started, out.num_tokens
        )

    def _with_bitmask(self, out):
        """Attach the allowed tokens of each constrained sequence that samples this step (its
        scheduled tokens reach its end: a decode, or the last chunk of a prompt)."""
        matchers = self._structured.matchers
        rows = [
            seq_id
            for seq_id, n in out.num_scheduled_tokens.items()
            if seq_id in matchers
            and (req := self._sequences[seq_id].request).num_computed_tokens + n == req.num_tokens
        ]
        return replace(out, grammar_bitmask=self._structured.bitmask(rows)) if rows else out

    def _advance_grammars(self, changed: list[Request]) -> None:
        """Feed each constrained sequence's new token to its matcher; a sequence whose grammar
        is complete ends ("stop") without sampling an EOS it can only take."""
        manager = self._structured
        for req in changed:
            seq_id = req.request_id
            if seq_id not in manager.matchers or req.is_finished:
                continue
            if not manager.accept(seq_id, req.output_token_ids[-1]):
                log.error("request %s: sampled a token its grammar refuses (%s); ended",
                          seq_id, manager.error(seq_id))  # fmt: skip
                self.scheduler.finish([seq_id], RequestStatus.FINISHED_ERROR)
            elif manager.is_terminated(seq_id):
                self.scheduler.finish([seq_id], RequestStatus.FINISHED_STOPPED)

    def _isolate(self, seq_ids: list[str], exc: Exception) -> tuple[RunnerOutput, list[str]]:
        """The step failed: run it again on halves, then halves of the failing halves, until
        the sequences that break it stand alone. Their results are the others' results; only
        the culprits (whole requests, by _fail) end with "error". At most 2n - 1 reruns, and
        only when a step failed."""
        log.warning("model step failed (%s: %s); isolating the request(s) that break it",
                    type(exc).__name__, exc)  # fmt: skip
        sampled: dict = {}
        prompt_logprobs: dict = {}
        pooled: dict = {}
        ranks: dict = {}
        culprits: list[str] = []
        pending = [seq_ids]
        while pending:
            group = pending.pop()
            try:
                partial = self.executor.retry(tuple(group))
            except ExecutorDeadError:
                raise
            except Exception as again:
                if len(group) == 1:
                    log.error("request %s fails the model step alone (%s: %s); ended",
                              group[0], type(again).__name__, again)  # fmt: skip
                    culprits.append(group[0])
                else:
                    pending += [group[: len(group) // 2], group[len(group) // 2 :]]
                continue
            sampled.update(partial.sampled)
            prompt_logprobs.update(partial.prompt_logprobs)
            pooled.update(partial.pooled)
            ranks.update(partial.prompt_ranks)
        return RunnerOutput(sampled, prompt_logprobs, pooled, ranks), culprits

    def _fail(self, seq_ids: list[str]) -> tuple[EngineCoreOutput, ...]:
        """End every sequence of the requests these sequences belong to, with "error"."""
        groups = {self._sequences[s].request_id for s in seq_ids if s in self._sequences}
        seqs = [self._sequences[s] for g in sorted(groups) for s in self._requests[g]]
        self.scheduler.finish([s.request.request_id for s in seqs], RequestStatus.FINISHED_ERROR)
        return tuple(self._output(s.request) for s in seqs)

    def _output(self, req: Request) -> EngineCoreOutput:
        seq = self._sequences[req.request_id]
        start = seq.num_sent_tokens
        seq.num_sent_tokens = req.num_output_tokens
        new_prompt_lps = new_ranks = None
        if req.params.prompt_logprobs is not None and seq.index == 0:
            new_prompt_lps = tuple(req.prompt_logprobs[seq.num_sent_prompt_logprobs :])
            new_ranks = tuple(req.prompt_ranks[seq.num_sent_prompt_logprobs :])
            seq.num_sent_prompt_logprobs = len(req.prompt_logprobs)
        out = EngineCoreOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_token_ids=tuple(req.output_token_ids[start:]),
            new_logprobs=tuple(req.logprobs[start:]) if req.params.logprobs is not None else None,
            new_prompt_logprobs=new_prompt_lps,
            finish_reason=req.status.finish_reason,
            stop_reason=req.stop_reason,
            num_cached_tokens=req.num_cached_tokens,
            metrics=metrics_of(req),
            pooled=req.pooled if req.is_finished else None,
            new_prompt_ranks=new_ranks,
        )
        if req.is_finished:
            self._forget(req.request_id)
        return out

    def _forget(self, seq_id: str) -> None:
        if self._structured is not None:
            self._structured.drop(seq_id)
        seq = self._sequences.pop(seq_id, None)
        if seq is None:
            return
        siblings = self._requests.get(seq.request_id, [])
        if all(s not in self._sequences for s in siblings):
            self._requests.pop(seq.request_id, None)

    # ---- state -------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._compiling)

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
            prefix_cache_queries=pool.num_cache_queries * self.kv.block_size,
            prefix_cache_hits=pool.num_cache_hits * self.kv.block_size,
            kv_tiers=self.kv.tiers.stats() if self.kv.tiers is not None else (),
            num_loading=self.scheduler.num_loading,
        )

    def shutdown(self) -> None:
        if self._structured is not None:
            self._structured.shutdown()
        flush = self.kv.flush_tiers()
        if flush is not None:  # the disk tier keeps every cached block for the next start
            try:
                self.executor.execute(SchedulerOutput({}, tier_ops=flush))
            except Exception as exc:  # noqa: BLE001 - a dead worker: nothing to save
                log.warning("could not write the KV cache to the disk tier at shutdown: %s", exc)
        self.executor.shutdown()
