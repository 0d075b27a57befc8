"""`tokenmill bench offline | latency | roofline`: the engine measured in-process."""

from __future__ import annotations

import json
import time
from typing import Any


def _engine(args):
    from tokenmill import LLM

    return LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len)


def _emit(result: dict[str, Any], json_out: str | None) -> None:
    print(json.dumps(result, indent=2))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)


def offline(args) -> int:
    from tokenmill.bench.offline import Workload, as_dict, commit, machine, run_tokenmill

    llm = _engine(args)
    vocab = llm.engine.loaded.arch.vocab_size
    warm = Workload(args.num_prompts, args.input_len, args.output_len, seed=args.seed + 1)
    run_tokenmill(llm, warm.prompts(vocab), args.output_len)  # warm-up, other prompts
    work = Workload(args.num_prompts, args.input_len, args.output_len, seed=args.seed)
    result = as_dict(run_tokenmill(llm, work.prompts(vocab), args.output_len))
    result.update(machine=machine(), commit=commit(), workload=vars(work))
    _emit(result, args.json_out)
    return 0


def latency(args) -> int:
    from tokenmill.bench.offline import Workload, commit, machine, tokenmill_decode_tps

    llm = _engine(args)
    vocab = llm.engine.loaded.arch.vocab_size
    prompts = Workload(args.repeats + 1, args.input_len, args.output_len, args.seed).prompts(vocab)
    tokenmill_decode_tps(llm, prompts[-1], args.output_len)  # warm-up
    runs = [tokenmill_decode_tps(llm, p, args.output_len) for p in prompts[:-1]]
    tps = sorted(r[0] for r in runs)
    ttft = sorted(r[1] for r in runs)
    _emit(
        {
            "decode_tokens_per_s_median": tps[len(tps) // 2],
            "ttft_ms_median": 1000 * ttft[len(ttft) // 2],
            "runs": runs,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "machine": machine(),
            "commit": commit(),
        },
        args.json_out,
    )
    return 0


def roofline(args) -> int:
    from dataclasses import asdict

    from tokenmill import SamplingParams
    from tokenmill.bench.offline import Workload, tokenmill_decode_tps
    from tokenmill.bench.roofline import cached, limits

    llm = _engine(args)
    loaded = llm.engine.loaded
    c = cached(loaded.device.type, args.refresh)
    lim = limits(
        loaded.arch.num_params, loaded.dtype.itemsize, c, str(loaded.dtype).removeprefix("torch.")
    )
    vocab = loaded.arch.vocab_size
    prompts = Workload(9, 512, 1, args.seed).prompts(vocab)
    tokenmill_decode_tps(llm, prompts[8][:128], 16)  # warm-up
    decode, _ = tokenmill_decode_tps(llm, prompts[8][::-1][:128], 64)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params, use_tqdm=False)
    prefill = 8 * 512 / (time.perf_counter() - t)
    rows = [
        ("decode, batch 1 (bandwidth-bound)", decode, lim.decode_tokens_per_s),
        ("prefill, 8 x 512 (compute-bound)", prefill, lim.prefill_tokens_per_s),
    ]
    print(
        f"ceilings ({c.method}): copy {c.copy_gbs:.1f} GB/s, read {c.read_gbs:.1f} GB/s, "
        f"fp32 {c.fp32_gflops:.0f} GFLOP/s, bf16 {c.bf16_gflops:.0f} GFLOP/s, int8 "
        f"{'n/a' if c.int8_gops is None else f'{c.int8_gops:.0f} GOP/s'}"
    )
    print(f"{'phase':<36} {'achieved tok/s':>15} {'limit tok/s':>12} {'fraction':>9}")
    for name, got, limit in rows:
        print(f"{name:<36} {got:>15.1f} {limit:>12.1f} {got / limit:>9.1%}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "ceilings": asdict(c),
                    "limits": asdict(lim),
                    "achieved": {"decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill},
                },
                f,
                indent=2,
            )
    return 0


def scaling(args) -> int:
    from tokenmill.bench.scaling import load_catalog, shape_of, sweep, with_bytes

    catalog = load_catalog(args.catalog)
    shape = with_bytes(shape_of(args.model, catalog), args.weight_bytes)
    if args.device not in catalog["devices"]:
        raise ValueError(f"device {args.device!r}: the catalogue has {', '.join(catalog['devices'])}")  # fmt: skip
    device = catalog["devices"][args.device]
    chips = [int(c) for c in args.chips.split(",")]
    scenario = {"mode": args.mode, "batch": args.batch, "context": args.context,
                "microbatches": args.microbatches}  # fmt: skip
    results = {}
    for name in args.links.split(","):
        if name not in catalog["links"]:
            raise ValueError(f"link {name!r}: the catalogue has {', '.join(catalog['links'])}")
        results[name] = sweep(shape, device, catalog["links"][name], catalog["links"], chips, **scenario)  # fmt: skip
    if args.json:
        print(json.dumps({"model": shape.name, "weights": shape.weights, "device": device.name,
                          **scenario, "links": results}, indent=2))  # fmt: skip
    else:
        print(f"{shape.name} ({shape.weights / 1e9:.1f} B weights x {shape.weight_bytes:g} B) on "
              f"{device.name}, {args.mode} batch {args.batch} x {args.context} tokens")  # fmt: skip
        print(f"{'link':14} {'kind':4} {'chips':>5} {'step ms':>9} {'comm':>6} {'tokens/s':>11} "
              f"{'effic.':>7} {'GB/chip':>8}  via")  # fmt: skip
        for name, rows in results.items():
            for r in rows:
                fits = "" if r["fits"] else " (does not fit)"
                print(f"{name:14} {r['parallelism']:4} {r['chips']:>5} {r['step_ms']:>9.2f} "
                      f"{r['comm_share']:>6.0%} {r['tokens_per_s']:>11.1f} {r['efficiency']:>7.0%} "
                      f"{r['memory_per_chip_gb']:>8.1f}  {r['link']}{fits}")  # fmt: skip
    if args.plot:
        from tokenmill.bench.plots import scaling_efficiency

        path = scaling_efficiency(results, args.plot,
                                  f"{shape.name} on {device.name}: {args.mode}, batch {args.batch} x {args.context}")  # fmt: skip
        print(f"plot: {path}")
    return 0
