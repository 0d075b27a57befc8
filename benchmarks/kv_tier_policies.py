"""Which blocks should the host tier keep? The tier's own policy (S3-FIFO, kv/tiers.py) against
LRU (its former policy), FIFO, LFU and Belady's optimum on the multi-turn chat of kv_tiers.py,
and what the compressed tier (kv_tier_dtype) buys.

    python benchmarks/kv_tier_policies.py --out benchmarks/results-kv-tier-policies.json \\
        --plot benchmarks/plots/kv-tier-policies.png

1. Record: the chat of kv_tiers.py (bundled SmolLM2 bf16, one request in flight, a device pool a
   quarter of the working set) with a host tier that holds everything, recording each block the
   pool evicts (`offload`) and each lookup below the pool (the blocks a prompt asks the tiers for
   after its device prefix). With one request in flight the pool's evictions do not depend on
   the tier (a block loaded or recomputed takes the same device block), so this trace is every
   policy's input. The tier's reservations and finished loads are recorded too (its pins).
2. Replay: each policy over the trace at host capacities from 5% to 125% of the working set. A
   lookup stops at its first miss (as KVCacheManager.find_prefix does); hits are blocks loaded
   instead of recomputed. Belady's optimum (evict, or do not admit, the block used farthest in
   the future) bounds what any policy could do. "tokenmill" is kv/tiers.py's TierPolicy itself,
   driven through offload / find / reserve / loaded; the others are written out here.
   A shifted workload (the trace, then the same trace on new block hashes: the users moved on)
   shows which policies let go of blocks that stopped being used.
3. Check, on the engine: a run with a host tier of `--check-share` of the working set must find
   exactly the hits the TierPolicy replay counts (the replay is the policy, not a model of it);
   the same with kv_tier_policy lru (the former policy), for TTFT side by side; then the same
   host bytes with kv_tier_dtype int8: its hits and TTFT next to the exact tier's.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import sys
import time
from collections import OrderedDict, deque
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_tiers import BYTES_PER_TOKEN, Chat, add_chat_arguments, engine_for, run_turns  # noqa: E402

from tokenmill.kv.tiers import TierPolicy  # noqa: E402

BLOCK_TOKENS = 16


# ---- the trace --------------------------------------------------------------------------------
def record(args, options: dict) -> tuple[list, dict]:
    """Run the chat; the tier events in order: ("offload", hash), ("lookup", [hashes]),
    ("reserve", (job, [hashes])) and ("loaded", job)."""
    engine = engine_for(options)
    kv, events = engine.kv, []
    evict, find, find_prefix = kv.pool.on_evict, kv.tiers.find, kv.find_prefix
    reserve, loaded, cancel = kv.tiers.reserve, kv.tiers.loaded, kv.tiers.cancel

    def on_reserve(hashes):
        hashes = list(hashes)
        job = reserve(hashes)
        events.append(("reserve", (job, hashes)))
        return job

    def on_loaded(job, failed=()):
        events.append(("loaded", job))
        return loaded(job, failed)

    def on_cancel(job):
        events.append(("loaded", job))
        return cancel(job)

    def on_evict(block_id, block_hash):
        events.append(("offload", block_hash))
        evict(block_id, block_hash)

    def on_find(block_hash):
        events[-1][1].append(block_hash)
        return find(block_hash)

    def on_find_prefix(req_id, token_ids):
        events.append(("lookup", []))
        return find_prefix(req_id, token_ids)

    kv.pool.on_evict, kv.tiers.find, kv.find_prefix = on_evict, on_find, on_find_prefix
    kv.tiers.reserve, kv.tiers.loaded, kv.tiers.cancel = on_reserve, on_loaded, on_cancel
    chat = Chat(args, engine.core.info.vocab_size)
    turns = run_turns(engine, chat, range(args.turns), args, "record")
    host = engine.core.stats().kv_tiers[0]
    engine.core.shutdown()
    events = [e for e in events if e[0] != "lookup" or e[1]]
    return events, {"turns": turns, "host_hits": host.hits, "host_blocks": host.num_blocks}


# ---- the policies (block hash -> kept or not; inclusive, as kv/tiers.py) --------------------
class Tokenmill:
    """kv/tiers.py's TierPolicy (a host tier, no disk), as the engine drives it: a hit is `find`;
    the use is counted, and the entries pinned, by `reserve` (of what this replay found: the
    recording's tier held more) until `loaded`."""

    def __init__(self, capacity: int, policy: str = "s3fifo") -> None:
        self.policy = TierPolicy(capacity, 0, 1, policy)
        self.found: set = set()  # the last lookup's hits
        self.jobs: dict = {}  # recorded job -> this policy's job (None: nothing found)

    def hit(self, h, t) -> bool:
        if self.policy.find(h):
            self.found.add(h)
            return True
        return False

    def offload(self, h, t) -> None:
        self.policy.offload(0, h)
        self.policy.take_ops()

    def reserve(self, job, hashes) -> None:
        mine = [h for h in hashes if h in self.found]
        self.found = set()
        self.jobs[job] = self.policy.reserve(mine) if mine else None

    def loaded(self, job) -> None:
        if (mine := self.jobs.pop(job)) is not None:
            self.policy.loaded(mine)


class LRU:
    """kv/tiers.py before S3-FIFO: an offload inserts (or touches) at the recent end; a hit
    touches."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.entries = capacity, OrderedDict()

    def hit(self, h, t) -> bool:
        if h in self.entries:
            self.entries.move_to_end(h)
            return True
        return False

    def offload(self, h, t) -> None:
        if h in self.entries:
            self.entries.move_to_end(h)
            return
        if len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)
        self.entries[h] = None


class FIFO(LRU):
    """Insertion order only: neither hits nor repeated offloads reorder."""

    def hit(self, h, t) -> bool:
        return h in self.entries

    def offload(self, h, t) -> None:
        if h in self.entries:
            return
        if len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)
        self.entries[h] = None


class LFU:
    """Fewest uses (offloads and hits) first, least recent among equals."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.uses, self.last = capacity, {}, {}

    def _use(self, h, t) -> None:
        self.uses[h] = self.uses.get(h, 0) + 1
        self.last[h] = t

    def hit(self, h, t) -> bool:
        if h in self.last:
            self._use(h, t)
            return True
        return False

    def offload(self, h, t) -> None:
        if h not in self.last and len(self.last) >= self.capacity:
            victim = min(self.last, key=lambda k: (self.uses[k], self.last[k]))
            del self.last[victim]  # its count stays: a block that returns keeps its history
        self._use(h, t)


class S3FIFO:
    """S3-FIFO (Yang et al., SOSP 2023): a small FIFO (10%) filters one-time blocks, a main FIFO
    with reinsertion keeps those used again, a ghost queue of hashes readmits recent evictees."""

    def __init__(self, capacity: int, threshold: int = 1) -> None:
        self.capacity, self.threshold = capacity, threshold
        self.small_cap = max(1, capacity // 10)
        self.small, self.main, self.ghost = deque(), deque(), OrderedDict()
        self.freq, self.where = {}, {}

    def hit(self, h, t) -> bool:
        if h in self.where:
            self.freq[h] = min(self.freq[h] + 1, 3)
            return True
        return False

    def offload(self, h, t) -> None:
        if h in self.where:
            self.freq[h] = min(self.freq[h] + 1, 3)
            return
        while len(self.where) >= self.capacity:
            self._evict()
        self.freq[h] = 0
        if h in self.ghost:
            del self.ghost[h]
            self.main.appendleft(h)
            self.where[h] = "main"
        else:
            self.small.appendleft(h)
            self.where[h] = "small"

    def _evict(self) -> None:
        if len(self.small) >= self.small_cap or not self.main:
            while self.small:
                t = self.small.pop()
                if self.freq[t] >= self.threshold:
                    self.main.appendleft(t)
                    self.where[t] = "main"
                    if len(self.main) > self.capacity - self.small_cap:
                        self._evict_main()
                else:
                    del self.where[t]
                    self.ghost[t] = None
                    if len(self.ghost) > self.capacity:
                        self.ghost.popitem(last=False)
                    return
        self._evict_main()

    def _evict_main(self) -> None:
        while self.main:
            t = self.main.pop()
            if self.freq[t] > 0:
                self.freq[t] -= 1
                self.main.appendleft(t)
            else:
                del self.where[t]
                return


class Belady:
    """The optimum with bypass: when full, drop (or do not admit) the block whose next lookup is
    farthest away; needs the future, so it only bounds the others."""

    def __init__(self, capacity: int, next_use: dict) -> None:
        self.capacity, self.next_use = capacity, next_use
        self.entries: dict = {}  # hash -> its next use
        self.heap: list = []  # (-next use, hash), stale entries skipped

    def _set(self, h, t) -> None:
        nxt = self.next_use[(h, t)]
        self.entries[h] = nxt
        heapq.heappush(self.heap, (-nxt, h))

    def hit(self, h, t) -> bool:
        if h in self.entries:
            self._set(h, t)
            return True
        return False

    def offload(self, h, t) -> None:
        if h in self.entries:
            self._set(h, t)
            return
        nxt = self.next_use[(h, t)]
        if len(self.entries) >= self.capacity:
            while -self.heap[0][0] != self.entries.get(self.heap[0][1]):
                heapq.heappop(self.heap)
            if -self.heap[0][0] <= nxt:
                return  # every kept block is needed sooner: do not admit this one
            del self.entries[heapq.heappop(self.heap)[1]]
        self._set(h, t)


TOKENMILL = "tokenmill (S3-FIFO, kv/tiers.py)"
POLICIES = {TOKENMILL: Tokenmill, "LRU (former)": LRU, "FIFO": FIFO, "LFU": LFU,
            "S3-FIFO (paper, freq > 1)": lambda c: S3FIFO(c, threshold=2)}  # fmt: skip


def next_uses(events: list) -> dict:
    """(hash, event index) -> index of the hash's next lookup (infinity if none)."""
    out, upcoming = {}, {}
    for t in range(len(events) - 1, -1, -1):
        kind, what = events[t]
        if kind not in ("lookup", "offload"):
            continue
        for h in what if kind == "lookup" else (what,):
            out[(h, t)] = upcoming.get(h, float("inf"))
        if kind == "lookup":
            for h in what:
                upcoming[h] = t
    return out


def replay(events: list, policy, count_from: int = 0) -> tuple[int, int]:
    """(blocks loaded, blocks asked) from event `count_from` on: a lookup stops at its first
    miss. Reservations and finished loads reach only the policies that pin (tokenmill's)."""
    hits = asked = 0
    for t, (kind, what) in enumerate(events):
        if kind == "offload":
            policy.offload(what, t)
        elif kind == "reserve":
            if hasattr(policy, "reserve"):
                policy.reserve(*what)
        elif kind == "loaded":
            if hasattr(policy, "loaded"):
                policy.loaded(what)
        else:
            found = 0
            if hasattr(policy, "found"):
                policy.found = set()
            for h in what:
                if not policy.hit(h, t):
                    break
                found += 1
            if t >= count_from:
                hits, asked = hits + found, asked + len(what)
    return hits, asked


def renamed(events: list, tag: bytes) -> list:
    """The same events on other block hashes (other users, other documents)."""
    out = []
    for kind, what in events:
        if kind == "offload":
            what = tag + what
        elif kind == "lookup":
            what = [tag + h for h in what]
        elif kind == "reserve":
            what = (("shifted", what[0]), [tag + h for h in what[1]])
        else:
            what = ("shifted", what)
        out.append((kind, what))
    return out


# ---- the check on the engine ------------------------------------------------------------------
def engine_run(args, options: dict, tag: str) -> dict:
    engine = engine_for(options)
    chat = Chat(args, engine.core.info.vocab_size)
    turns = run_turns(engine, chat, range(args.turns), args, tag)
    host = engine.core.stats().kv_tiers[0]
    engine.core.shutdown()
    later = statistics.median(t["ttft_p50_s"] for t in turns[1:])
    return {"host_blocks": host.num_blocks, "host_hits": host.hits, "ttft_p50_turns_2plus_s": later,
            "turns": turns}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_chat_arguments(p)
    p.add_argument("--check-share", type=float, default=0.4, help="host tier / working set, checked on the engine")  # fmt: skip
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    args.concurrency = 1  # the trace is policy-independent only with one request in flight
    from tokenmill.bench.offline import commit, machine

    final_len = args.system + args.turns * (args.user + args.answer)
    working = (args.system + args.chats * (final_len - args.system)) * BYTES_PER_TOKEN
    device = max(int(working * args.device_share), (final_len + 64) * BYTES_PER_TOKEN)
    base = {"max_model_len": final_len + args.answer + 16, "max_num_seqs": 1,
            "kv_cache_memory": device}  # fmt: skip
    block_bytes = BYTES_PER_TOKEN * BLOCK_TOKENS
    working_blocks = working // block_bytes
    bar = tqdm(total=4, desc="engine runs")
    events, recorded = record(args, {**base, "kv_host_memory": int(working * 1.25)})
    bar.update(1)
    shares = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25]
    future = next_uses(events)
    curves: dict = {name: [] for name in [*POLICIES, "Belady (optimum)"]}
    for share in tqdm(shares, desc="replays"):
        capacity = max(1, int(working_blocks * share))
        for name, cls in POLICIES.items():
            curves[name].append(replay(events, cls(capacity))[0])
        curves["Belady (optimum)"].append(replay(events, Belady(capacity, future))[0])
    asked = replay(events, LRU(1))[1]
    hits_if_all = replay(events, LRU(10**9))[0]
    # the shifted workload: the trace, then the same on new hashes; hits in the second half
    both = events + renamed(events, b"shifted:")
    future_both = next_uses(both)
    shifted_shares = [0.2, 0.4, 0.6]
    shifted: dict = {name: [] for name in curves}
    for share in tqdm(shifted_shares, desc="shifted replays"):
        capacity = max(1, int(working_blocks * share))
        for name, cls in POLICIES.items():
            shifted[name].append(replay(both, cls(capacity), len(events))[0])
        shifted["Belady (optimum)"].append(replay(both, Belady(capacity, future_both), len(events))[0])  # fmt: skip
    # the check: the engine's LRU host tier at --check-share, then the same bytes in int8
    host_bytes = int(working * args.check_share)
    exact = engine_run(args, {**base, "kv_host_memory": host_bytes}, "exact")
    bar.update(1)
    lru_run = engine_run(args, {**base, "kv_host_memory": host_bytes, "kv_tier_policy": "lru"}, "lru")  # fmt: skip
    bar.update(1)
    int8 = engine_run(args, {**base, "kv_host_memory": host_bytes, "kv_tier_dtype": "int8"}, "int8")  # fmt: skip
    bar.update(1)
    bar.close()
    replayed = replay(events, Tokenmill(exact["host_blocks"]))[0]
    replayed_int8 = replay(events, Tokenmill(int8["host_blocks"]))[0]
    lru, lru_int8 = (replay(events, LRU(r["host_blocks"]))[0] for r in (exact, int8))
    replayed_lru = replay(events, Tokenmill(lru_run["host_blocks"], "lru"))[0]
    results = {
        "machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "working_set_blocks": working_blocks, "device_pool_mib": device / 2**20,
        "trace": {"events": len(events), "lookups": sum(e[0] == "lookup" for e in events),
                  "blocks_asked": asked, "hits_with_every_block_kept": hits_if_all,
                  "recorded_host_hits": recorded["host_hits"]},
        "shares": shares, "hits": curves,
        "shifted": {"shares": shifted_shares, "second_half_hits": shifted},
        "check": {"host_share": args.check_share, "exact": exact, "int8": int8,
                  "replay_hits": replayed, "replay_hits_int8_capacity": replayed_int8,
                  "lru_hits": lru, "lru_hits_int8_capacity": lru_int8,
                  "lru_engine": lru_run, "lru_engine_replay_hits": replayed_lru},
    }  # fmt: skip
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


def report(r: dict) -> None:
    tr = r["trace"]
    print(f"{r['machine']}, commit {r['commit']}; working set {r['working_set_blocks']} blocks; "
          f"trace: {tr['lookups']} lookups asking {tr['blocks_asked']} blocks, "
          f"{tr['hits_with_every_block_kept']} hits with every block kept "
          f"(the recording engine found {tr['recorded_host_hits']})")  # fmt: skip
    names = list(r["hits"])
    best = tr["hits_with_every_block_kept"]
    print("% of the reusable blocks loaded, by host tier / working set")
    print(f"{'policy':<34}" + "".join(f"{s:>7.2f}" for s in r["shares"]))
    for n in names:
        print(f"{n:<34}" + "".join(f"{h / best:7.1%}" for h in r["hits"][n]))
    sh = r["shifted"]
    print("shifted workload (the trace, then on new hashes): % loaded in the second half")
    print(f"{'policy':<34}" + "".join(f"{s:>7.2f}" for s in sh["shares"]))
    for n in names:
        print(f"{n:<34}" + "".join(f"{h / best:7.1%}" for h in sh["second_half_hits"][n]))
    c = r["check"]
    print(f"engine check at {c['host_share']:.0%}: exact tier {c['exact']['host_blocks']} blocks, "
          f"{c['exact']['host_hits']} hits (TierPolicy replay {c['replay_hits']}, LRU "
          f"{c['lru_hits']}); int8 tier {c['int8']['host_blocks']} blocks, "
          f"{c['int8']['host_hits']} hits (replay {c['replay_hits_int8_capacity']}, LRU "
          f"{c['lru_hits_int8_capacity']}); kv_tier_policy lru: {c['lru_engine']['host_hits']} "
          f"hits (replay {c['lru_engine_replay_hits']}); TTFT p50 turns 2+: s3fifo "
          f"{c['exact']['ttft_p50_turns_2plus_s'] * 1e3:.0f} ms, lru "
          f"{c['lru_engine']['ttft_p50_turns_2plus_s'] * 1e3:.0f} ms, int8 s3fifo "
          f"{c['int8']['ttft_p50_turns_2plus_s'] * 1e3:.0f} ms")  # fmt: skip


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = r["trace"]["hits_with_every_block_kept"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, hits in r["hits"].items():
        style = "--" if "Belady" in name else "-"
        width = 2.6 if name == TOKENMILL else 1.2
        ax.plot([100 * s for s in r["shares"]], [100 * h / best for h in hits], style, lw=width, marker="o", ms=3, label=name)  # fmt: skip
    ax.set_xlabel("host tier, % of the working set")
    ax.set_ylabel("% of the reusable blocks loaded, not recomputed")
    ax.set_title(f"KV host tier policies, multi-turn chat trace ({r['commit']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
