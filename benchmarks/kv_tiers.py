"""KV tiers on a multi-turn chat: recompute, host tier, host + disk, unlimited pool; warm restart.

    python benchmarks/kv_tiers.py --out benchmarks/results-kv-tiers.json

The bundled SmolLM2-135M (bf16): `--chats` conversations of `--turns` turns share a
`--system`-token system prompt; each turn adds `--user` user tokens and the model answers
`--answer` tokens (greedy, the answer joins the history), and every conversation's turn t is
sent in turn (conversation 0, 1, ..., then 0's next turn; `--concurrency` requests in flight),
so between two turns of one conversation the others run and push its blocks out of a device
pool sized to `--device-share` of the working set (every conversation's KV at the end). Per turn: TTFT p50/p99
(arrival to first token, queueing included, as a server sees it) and output tokens/s.
Configurations, one after another in one process: recompute (no tiers), host tier (the whole
working set), host (a quarter of it) + disk, unlimited device pool. Then a restart: a fresh
engine on the disk directory that the host + disk run left (it flushed its pool and host tier
to disk at shutdown) against one on an empty directory, each sent one more turn.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2-135M: layers x K/V x KV heads x dim x bf16


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class Chat:
    """Histories of the conversations; the same user tokens in every configuration."""

    def __init__(self, args, vocab: int) -> None:
        rng = random.Random(0)
        words = lambda n: [rng.randrange(100, vocab - 100) for _ in range(n)]  # noqa: E731
        self.system = words(args.system)
        self.users = [[words(args.user) for _ in range(args.turns + 1)] for _ in range(args.chats)]
        self.histories = [list(self.system) for _ in range(args.chats)]


def run_turns(engine, chat: Chat, turns: range, args, tag: str) -> list[dict]:
    """Round-robin: conversation 0's turn, 1's, ..., 15's, then 0's next turn, with at most
    `--concurrency` requests in flight (a turn is sent once the previous one is answered)."""
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.answer, temperature=0.0, ignore_eos=True)
    order = [(t, c) for t in turns for c in range(args.chats)]
    sent: dict[str, tuple[int, int, float]] = {}
    per_turn = {
        t: {"ttft": [], "cached": 0, "prompt": 0, "first": None, "last": 0.0} for t in turns
    }
    busy: set[int] = set()  # conversations with a turn in flight
    while order or engine.has_unfinished():
        while order and len(sent) < args.concurrency and order[0][1] not in busy:
            t, c = order.pop(0)
            chat.histories[c].extend(chat.users[c][t])
            rid = f"{tag}-t{t}-c{c}"
            engine.add_request(rid, list(chat.histories[c]), params)
            now = time.perf_counter()
            sent[rid] = (t, c, now)
            busy.add(c)
            stats = per_turn[t]
            stats["first"] = stats["first"] or now
            stats["prompt"] += len(chat.histories[c])
        for o in engine.step():
            if not o.finished:
                continue
            t, c, _ = sent.pop(o.request_id)
            busy.discard(c)
            chat.histories[c].extend(o.outputs[0].token_ids)
            stats = per_turn[t]
            stats["ttft"].append(o.metrics.ttft)
            stats["cached"] += o.num_cached_tokens
            stats["last"] = time.perf_counter()
    out = []
    for t in turns:
        s = per_turn[t]
        out.append({
            "ttft_p50_s": statistics.median(s["ttft"]), "ttft_p99_s": percentile(s["ttft"], 99),
            "output_tokens_per_s": args.chats * args.answer / (s["last"] - s["first"]),
            "prompt_tokens": s["prompt"], "cached_tokens": s["cached"],
        })  # fmt: skip
    return out


def engine_for(options: dict):
    """An engine past its first step (thread pools, first page faults): a 4-token request,
    shorter than a block, so it leaves nothing in the prefix cache."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig.from_kwargs(model="default", dtype="bfloat16", **options))
    engine.add_request("warm-up", [5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return engine


def conversation(args, options: dict, name: str) -> tuple[list[dict], dict, Chat]:
    engine = engine_for(options)
    chat = Chat(args, engine.core.info.vocab_size)
    turns = run_turns(engine, chat, range(args.turns), args, name)
    stats = engine.core.stats()
    tiers = [{k: getattr(s, k) for k in ("name", "hits", "misses", "blocks_in", "blocks_out",
              "blocks_evicted", "load_count", "load_seconds_sum")} for s in stats.kv_tiers]  # fmt: skip
    engine.core.shutdown()
    return turns, {"preemptions": stats.num_preemptions, "tiers": tiers}, chat


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    """The multi-turn chat's shape (what `Chat` and the KV budgets read)."""
    p.add_argument("--chats", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system", type=int, default=256)
    p.add_argument("--user", type=int, default=64)
    p.add_argument("--answer", type=int, default=48)
    p.add_argument("--device-share", type=float, default=0.25, help="device pool / working set")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_chat_arguments(p)
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight at once")
    p.add_argument("--disk-dir", type=Path, help="default: a temporary directory")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from tokenmill.bench.offline import commit, machine

    per_turn = args.user + args.answer
    final_len = args.system + args.turns * per_turn + args.user  # the restart turn included
    working = (args.system + args.chats * (final_len - args.system)) * BYTES_PER_TOKEN
    device = max(int(working * args.device_share), (final_len + 64) * BYTES_PER_TOKEN)
    disk_dir = args.disk_dir or Path(tempfile.mkdtemp(prefix="kv-tiers-"))
    base = {"max_model_len": final_len + args.answer + 16, "max_num_seqs": args.concurrency}
    configs = {
        "recompute": {"kv_cache_memory": device},
        "host": {"kv_cache_memory": device, "kv_host_memory": int(working * 1.25)},
        "host+disk": {"kv_cache_memory": device, "kv_host_memory": working // 4,
                      "kv_disk_dir": str(disk_dir / "warm"), "kv_disk_memory": 4 * working},
        "unlimited": {"kv_cache_memory": int(working * 1.5)},
    }  # fmt: skip
    results: dict = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
                     "args": {k: str(v) for k, v in vars(args).items()},
                     "working_set_mib": working / 2**20, "device_pool_mib": device / 2**20}  # fmt: skip
    bar = tqdm(total=len(configs) + 2, desc="configurations")
    chats = {}
    for name, options in configs.items():
        bar.set_postfix_str(name)
        turns, info, chats[name] = conversation(args, {**base, **options}, name)
        results[name] = {"turns": turns, **info}
        bar.update(1)
    # the restart: one more turn, against the disk the host + disk run left, and a cold disk
    for name, directory in (("restart-warm", disk_dir / "warm"), ("restart-cold", disk_dir / "cold")):  # fmt: skip
        options = {**configs["host+disk"], "kv_disk_dir": str(directory)}
        engine = engine_for({**base, **options})
        chat = chats["host+disk"]
        saved = [list(h) for h in chat.histories]
        (results[name],) = run_turns(engine, chat, range(args.turns, args.turns + 1), args, name)
        chat.histories = saved  # the cold run gets the same prompts
        engine.core.shutdown()
        bar.update(1)
    bar.close()
    if not args.disk_dir:
        shutil.rmtree(disk_dir, ignore_errors=True)
    report(results, args.turns)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def report(results: dict, turns: int) -> None:
    print(f"{results['machine']}, commit {results['commit']}; working set "
          f"{results['working_set_mib']:.0f} MiB, device pool {results['device_pool_mib']:.0f} MiB")  # fmt: skip
    names = ("recompute", "host", "host+disk", "unlimited")
    print("TTFT p50 / p99 ms, output tok/s, per turn:")
    print("turn " + "".join(f"{n:>30}" for n in names))
    for t in range(turns):
        cells = []
        for n in names:
            r = results[n]["turns"][t]
            cells.append(f"{r['ttft_p50_s'] * 1e3:8.0f} /{r['ttft_p99_s'] * 1e3:6.0f} {r['output_tokens_per_s']:7.1f}")  # fmt: skip
        print(f"{t + 1:4} " + "".join(f"{c:>30}" for c in cells))
    later = {n: statistics.median(r["ttft_p50_s"] for r in results[n]["turns"][1:]) for n in names}
    print("turns 2+, median of per-turn TTFT p50: " + ", ".join(f"{n} {v * 1e3:.0f} ms" for n, v in later.items()))  # fmt: skip
    print(f"host tier vs recompute: {later['recompute'] / later['host']:.1f}x better; "
          f"vs unlimited: {later['host'] / later['unlimited']:.2f}x")  # fmt: skip
    w, c = results["restart-warm"], results["restart-cold"]
    print(f"restart: warm TTFT p50 {w['ttft_p50_s'] * 1e3:.0f} ms, cold {c['ttft_p50_s'] * 1e3:.0f} ms "
          f"({c['ttft_p50_s'] / w['ttft_p50_s']:.1f}x); cached prompt tokens {w['cached_tokens']} vs {c['cached_tokens']}")  # fmt: skip


if __name__ == "__main__":
    main()
