"""The scheduler's output is a value: new requests sent once, then deltas that a worker folds
into its own state (InputBatch) and ends up holding exactly the scheduler's tokens and tables,
through chunked prefill, prefix hits, preemption, n > 1 forks with copy-on-write, and aborts."""

import pickle
import random

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.engine.messages import RunnerOutput, SampledToken
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kv.manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.input_batch import InputBatch


def make(num_blocks=64, block_size=4, **cfg):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 32, **cfg})
    return Scheduler(config, kv, max_model_len=64)


def req(rid, prompt, max_tokens=4, **params):
    p = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **params)
    return Request(rid, list(prompt), p, frozenset(), 64)


def step(s, batch, rng):
    out = pickle.loads(pickle.dumps(s.schedule()))  # what crosses a process
    states = batch.apply(out)
    for st in states:  # the worker's view equals the scheduler's, before this step's tokens
        r = s.requests[st.state.request_id]
        assert st.state.all_token_ids == r.all_token_ids
        assert st.state.block_ids == s.kv.block_tables[r.request_id]
        assert st.state.num_computed_tokens == r.num_computed_tokens
    sampled = {
        st.state.request_id: SampledToken(rng.randrange(1, 90)) for st in states if st.samples
    }
    s.update(out, RunnerOutput(sampled))
    return out


def test_new_once_then_deltas():
    s, batch, rng = make(), InputBatch(), random.Random(0)
    s.add(req("a", range(10)))
    first = step(s, batch, rng)
    assert [d.request_id for d in first.new_requests] == ["a"] and not first.cached_requests
    second = step(s, batch, rng)
    assert not second.new_requests
    (delta,) = second.cached_requests
    assert delta.new_token_ids == (s.requests["a"].output_token_ids[0],)  # fed this step
    assert delta.num_computed_tokens == 10
    assert delta.new_block_ids == ()  # position 10 still fits in the third block


def test_finished_and_preempted_ids_are_reported():
    s, batch, rng = make(num_blocks=4, max_num_batched_tokens=64), InputBatch(), random.Random(1)
    s.add(req("a", range(7), max_tokens=8))
    s.add(req("b", range(50, 57), max_tokens=8))
    outs = [step(s, batch, rng) for _ in range(3)]
    assert outs[2].preempted_request_ids == ("b",) and "b" not in batch.requests
    resumed = None
    while s.has_unfinished():
        out = step(s, batch, rng)
        resumed = resumed or next((d for d in out.new_requests if d.request_id == "b"), None)
    assert resumed is not None and len(resumed.token_ids) > 7  # comes back with its outputs
    batch.apply(s.schedule())  # the output after the last finish tells the workers
    assert not batch.requests


@pytest.mark.parametrize("seed", range(6))
def test_worker_state_mirrors_scheduler_under_random_load(seed):
    rng = random.Random(seed)
    s = make(num_blocks=rng.choice([12, 20, 64]), max_num_batched_tokens=rng.choice([8, 16, 64]))
    batch = InputBatch()
    shared = [rng.randrange(1, 90) for _ in range(9)]
    for i in range(12):
        prompt = (shared if rng.random() < 0.5 else []) + [
            rng.randrange(1, 90) for _ in range(rng.randrange(1, 14))
        ]
        parent = req(f"r{i}", prompt, max_tokens=rng.randrange(1, 9))
        n = rng.choice([1, 1, 3])
        if n > 1:  # forked siblings, as the engine core makes them
            kids = [req(f"r{i}#{k}", prompt, max_tokens=parent.max_tokens) for k in range(1, n)]
            parent.fork_children = kids
            for kid in kids:
                s.add_forked(kid)
        s.add(parent)
        for _ in range(rng.randrange(0, 3)):
            step(s, batch, rng)
        if rng.random() < 0.2 and s.running:
            s.finish([rng.choice(s.running).request_id], RequestStatus.FINISHED_ABORTED)
    for _ in range(500):
        if not s.has_unfinished():
            break
        step(s, batch, rng)
    assert not s.has_unfinished() and s.kv.pool.num_used_blocks == 0
    batch.apply(s.schedule())  # every finished or aborted id reaches the workers
    assert not batch.requests
