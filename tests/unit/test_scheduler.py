"""Scheduler: budgets, chunked prefill, FCFS, preemption of the newest, aborts, no leaks."""

from tokenmill.config import SchedulerConfig
from tokenmill.engine.messages import RunnerOutput, SampledToken
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kv.manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, **cfg):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 32, **cfg})
    return Scheduler(config, kv, max_model_len=64)


def req(rid, n_prompt, max_tokens=4, start=0):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return Request(rid, list(range(start, start + n_prompt)), params, frozenset({0}), 64)


def computed(out):
    """request id -> tokens cached before the step, from the output's values alone."""
    data = (*out.new_requests, *out.cached_requests)
    return {d.request_id: d.num_computed_tokens for d in data}


def scheduled(out):
    """[(request id, computed before, new this step)] in schedule order."""
    before = computed(out)
    return [(r, before[r], n) for r, n in out.num_scheduled_tokens.items()]


def run_step(s, token=7):
    out = s.schedule()
    sampled = {
        r: SampledToken(token) for r, c, n in scheduled(out) if c + n == s.requests[r].num_tokens
    }
    s.update(out, RunnerOutput(sampled))
    return out


def test_chunked_prefill_splits_long_prompt_under_budget():
    s = make(max_num_batched_tokens=16)
    r = req("a", 40)
    s.add(r)
    sizes = [scheduled(run_step(s))[0][2] for _ in range(3)]
    assert sizes == [16, 16, 8]
    assert r.num_output_tokens == 1  # sampled only when the prompt was complete


def test_decodes_first_then_prefill_chunks_fill_budget():
    s = make(max_num_batched_tokens=10)
    s.add(req("a", 3))
    run_step(s)  # a prefilled, has 1 token
    s.add(req("b", 20, start=100))
    out = run_step(s)
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 9)]


def test_fcfs_and_max_num_seqs():
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(req(f"r{i}", 2, start=10 * i))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]


def test_preempts_newest_when_blocks_run_out_and_recomputes():
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a, b = req("a", 7, max_tokens=8), req("b", 7, max_tokens=8, start=50)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 2 blocks each, pool full
    assert s.kv.pool.num_free_blocks == 0
    assert run_step(s).num_preempted == 0  # position 7 still fits in each second block
    out = run_step(s)  # both need a third block for position 8: b (newest) is preempted
    assert out.num_preempted == 1 and b.status is RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and s.waiting[0] is b
    while s.has_unfinished():
        run_step(s)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert b.all_token_ids[:7] == list(range(50, 57))
    assert s.kv.pool.num_used_blocks == 0


def test_abort_frees_blocks_waiting_or_running():
    s = make()
    a, b = req("a", 10), req("b", 10, start=40)
    s.add(a)
    run_step(s)
    s.add(b)
    s.finish(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert a.status is RequestStatus.FINISHED_ABORTED and b.status is RequestStatus.FINISHED_ABORTED
    assert not s.has_unfinished() and s.kv.pool.num_used_blocks == 0


def test_max_tokens_finishes_and_frees():
    s = make()
    r = req("a", 5, max_tokens=3)
    s.add(r)
    for _ in range(3):
        run_step(s)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 3
    assert s.kv.pool.num_used_blocks == 0


def test_eos_respects_min_tokens():
    s = make()
    params = SamplingParams(max_tokens=5, min_tokens=2, temperature=0)
    r = Request("a", [5, 6, 7], params, frozenset({9}), 64)
    s.add(r)
    run_step(s, token=9)
    assert not r.is_finished  # 1 < min_tokens
    run_step(s, token=9)
    assert r.status is RequestStatus.FINISHED_STOPPED


def test_prefix_cache_hit_skips_computed_tokens():
    s = make(max_num_batched_tokens=64)
    s.add(req("a", 12))
    run_step(s)
    s.add(req("b", 12))
    out = run_step(s)
    assert [x for x in scheduled(out) if x[0] == "b"] == [("b", 8, 4)]
    assert s.requests["b"].num_cached_tokens == 8
