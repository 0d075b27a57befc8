"""`tokenmill serve | generate`: the command line. Engine options come from the config docs."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tokenmill.cli_options import add_config_options
from tokenmill.config import EngineConfig, ServeConfig, option_help


def add_engine_options(p: argparse.ArgumentParser) -> None:
    add_config_options(p.add_argument_group("engine options"), option_help(), skip={"model"})


def add_serve_options(p: argparse.ArgumentParser) -> None:
    add_config_options(p.add_argument_group("server options"), option_help((ServeConfig,)))


def serve_config(args: argparse.Namespace) -> ServeConfig:
    given = {n: getattr(args, n) for n in option_help((ServeConfig,))}
    given = {n: tuple(v) if isinstance(v, list) else v for n, v in given.items() if v is not None}
    return ServeConfig(**given)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = set(option_help()) - {"model"}
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "profile", None) is not None:  # serve, generate: the hardware profile
        from tokenmill.profiles.commands import apply_profile

        given = apply_profile(args.profile, args.model, given)
    return EngineConfig.from_kwargs(model=args.model, **given)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenmill",
        description="An inference-optimized LLM "
        "microservice: OpenAI-compatible serving, paged attention, "
        "continuous batching.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /metrics).",
    )
    s.add_argument(
        "--model",
        default="default",
        help="HF folder, .gguf file, or 'default' (the bundled SmolLM2-135M-Instruct)",
    )
    s.add_argument(
        "--config",
        metavar="FLEET.toml",
        help="serve several instances behind this endpoint instead of one --model: one "
        "[[instances]] table each (name, model, slice, replicas, engine options); each runs "
        "bound to its slice in its own process, requests go to an instance by `model`, a dead "
        "or hung instance is restarted. Engine options given here are every instance's "
        "defaults. Check a layout first with `tokenmill partition plan --config FLEET.toml`",
    )
    s.add_argument(
        "--instance-hang-after",
        type=float,
        default=120.0,
        metavar="S",
        help="with --config: an instance whose core sends nothing for S seconds while it has "
        "requests is killed and restarted (a long prefill step sends nothing: be generous)",
    )
    s.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --config: place every replica as a Ray actor on the Ray cluster at ADDR "
        "('auto', HOST:PORT, ray://HOST:PORT), each asking for its slice's CPUs or GPU share; "
        "this process keeps routing and supervising them (needs the 'ray' extra)",
    )
    from tokenmill.cost.commands import add_parsers as add_cost_parsers
    from tokenmill.cost.commands import add_usage_options

    add_usage_options(s)
    add_serve_options(s)
    add_engine_options(s)
    from tokenmill.profiles.commands import add_parsers as add_profile_parsers
    from tokenmill.profiles.commands import add_profile_option

    add_profile_option(s)

    g = sub.add_parser("generate", help="complete one prompt, streaming to the terminal")
    g.add_argument("prompt", help="the prompt (or the user message with --chat)")
    g.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    add_engine_options(g)
    add_profile_option(g)

    from tokenmill.quant.commands import add_parsers as add_quant_parsers

    add_quant_parsers(sub, add_engine_options)
    add_cost_parsers(sub)
    from tokenmill.partition.commands import add_parsers as add_partition_parsers

    add_partition_parsers(sub)
    add_profile_parsers(sub)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bs = b.add_parser(
        "serve",
        help="load-test any OpenAI-compatible server",
        description="Async load generator: Poisson arrivals at --request-rate, or "
        "as fast as --max-concurrency allows; reports throughput, TTFT, TPOT, ITL, "
        "end-to-end latency (mean, median, p90, p99) and goodput under SLOs.",
    )
    bs.add_argument("--base-url", default="http://127.0.0.1:8000")
    bs.add_argument("--model", default=None, help="model name to send (default: none)")
    bs.add_argument("--api-key", default=None)
    bs.add_argument("--num-prompts", type=int, default=100)
    rate = bs.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", type=float, default=None, help="requests/s, Poisson")
    rate.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    bs.add_argument(
        "--dataset",
        default="random",
        help="random, sharegpt-like (synthetic, log-normal lengths) or a .jsonl file",
    )
    bs.add_argument(
        "--input-len", type=int, default=128, help="prompt tokens (median for sharegpt-like)"
    )
    bs.add_argument("--output-len", type=int, default=128, help="output tokens (median likewise)")
    bs.add_argument(
        "--vocab-size", type=int, default=32000, help="token id range of random prompts"
    )
    bs.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="random dataset: lengths uniform within +-this fraction of --input-len/--output-len",
    )
    bs.add_argument("--slo-ttft-ms", type=float, default=None)
    bs.add_argument("--slo-tpot-ms", type=float, default=None)
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--json-out", default=None)
    bs.add_argument("--plot-dir", default=None, help="write PNG plots (latency CDFs; sweep curves)")
    bs.add_argument(
        "--sweep",
        default=None,
        help="comma-separated request rates: one run each, "
        "then throughput and latency against rate",
    )

    sc = b.add_parser(
        "scaling",
        help="the interconnect model: TP/PP step time, communication share, tokens/s and "
        "scaling efficiency from 1 to N chips per link (pure arithmetic, no hardware)",
        description="Predict where a model stops scaling: per chip count, tensor and pipeline "
        "parallel step time, the share spent on all-reduces, sends and bubbles, tokens/s and "
        "efficiency T(1)/(n T(n)), for a device and one or more links of the catalogue "
        "(tokenmill/bench/scaling.toml; extend it with --catalog).",
    )
    sc.add_argument("--model", default="llama-3.1-70b",
                    help="a catalogue shape (llama-3.1-8b, -70b, -405b, smollm2-135m) or an HF folder")  # fmt: skip
    sc.add_argument("--device", default="h100", help="a catalogue device (h100, h200, b200, gb200, cpu-2core)")  # fmt: skip
    sc.add_argument("--links", default="nvlink4", help="comma-separated catalogue links (nvlink5, nvlink4, pcie5, pcie4, ib-ndr, eth-400g, eth-100g, gloo-loopback)")  # fmt: skip
    sc.add_argument("--chips", default="1,2,4,8,16,32,64,72", help="chip counts")
    sc.add_argument("--mode", default="decode", choices=["decode", "prefill"])
    sc.add_argument("--batch", type=int, default=32, help="sequences in the step")
    sc.add_argument("--context", type=int, default=4096, help="tokens each holds (decode) or its prompt (prefill)")  # fmt: skip
    sc.add_argument("--microbatches", type=int, default=None, help="PP micro-batches (default: pp, or the batch when smaller)")  # fmt: skip
    sc.add_argument("--weight-bytes", type=float, default=2.0, help="bytes per weight (2 bf16, 1 fp8/int8, 0.5625 4-bit)")  # fmt: skip
    sc.add_argument("--catalog", default=None, help="a TOML of devices/links/models extending the catalogue")  # fmt: skip
    sc.add_argument("--plot", default=None, metavar="PNG", help="efficiency against chips, a line per link and kind")  # fmt: skip
    sc.add_argument("--json", action="store_true", help="rows as JSON")

    for name, text in (
        ("offline", "offline engine throughput on random-token prompts"),
        ("latency", "batch-1 TTFT and decode speed"),
        (
            "roofline",
            "achieved rate / the limit the machine's bandwidth and "
            "matmul rate impose (ceilings measured once, cached)",
        ),
    ):
        e = b.add_parser(name, help=text, description=text)
        e.add_argument("--model", default="default")
        e.add_argument("--dtype", default="auto")
        e.add_argument("--max-model-len", type=int, default=1024)
        e.add_argument("--num-prompts", type=int, default=64)
        e.add_argument("--input-len", type=int, default=128)
        e.add_argument("--output-len", type=int, default=128)
        e.add_argument("--repeats", type=int, default=3, help="latency: runs, median reported")
        e.add_argument("--refresh", action="store_true", help="roofline: re-measure ceilings")
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--json-out", default=None)
    return p


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from tokenmill.bench import plots
    from tokenmill.bench.metrics import report
    from tokenmill.bench.serve import load_dataset, run_load

    samples = load_dataset(
        args.dataset,
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.seed,
        args.vocab_size,
        args.range_ratio,
    )
    rates = [float(r) for r in args.sweep.split(",")] if args.sweep else [args.request_rate]
    results = []
    for rate in rates:
        records, duration = asyncio.run(
            run_load(
                args.base_url,
                samples,
                args.model,
                rate,
                args.max_concurrency,
                args.api_key,
                args.seed,
            )
        )
        result = report(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
        result["config"] = {k: v for k, v in vars(args).items() if k != "api_key"}
        result["config"]["request_rate"] = rate
        _print_report(result, [r.error for r in records if not r.ok][:3])
        results.append((rate, result))
        if args.plot_dir and not args.sweep:
            print(f"plot: {plots.latency_cdfs(records, args.plot_dir, args.base_url)}")
    if args.sweep and args.plot_dir:
        print(f"plot: {plots.sweep(results, args.plot_dir, args.base_url)}")
    if args.json_out:
        body = results[0][1] if not args.sweep else [r for _, r in results]
        with open(args.json_out, "w") as f:
            json.dump(body, f, indent=2)
    return 0 if all(r["completed"] for _, r in results) else 1


def _print_report(result: dict, errors: list) -> None:
    rate = result["config"]["request_rate"]
    print(f"{'request rate':>24}: {'max' if rate is None else rate}")
    for key in (
        "duration_s",
        "completed",
        "failed",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "goodput",
    ):
        value = result[key]
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = "  ".join(f"{k} {v:8.1f}" for k, v in result[key].items())
        print(f"{key:>24}: {stats}")
    if errors:
        print(f"{'first errors':>24}: {errors}")


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.sampling_params import SamplingParams

    engine = LLMEngine(engine_config(args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p
    )
    prompt: Any = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = {"prompt": text, "prompt_token_ids": engine.tokenizer.encode(text, False)}
    engine.add_request("cli", prompt, params)
    shown = 0
    while engine.has_unfinished():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the rest
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "tco":
            from tokenmill.cost import commands as cost_commands

            return cost_commands.run(args)
        if args.command == "profiles":
            from tokenmill.profiles import commands as profile_commands

            return profile_commands.run(args)
        if args.command == "partition":
            from tokenmill.partition import commands as partition_commands

            return partition_commands.run(args)
        if args.command in ("quantize", "eval"):
            from tokenmill.quant import commands as quant_commands

            return quant_commands.run(args, engine_config)
        if args.command == "bench":
            if args.bench == "serve":
                return cmd_bench_serve(args)
            from tokenmill.bench import commands

            return getattr(commands, args.bench)(args)
        from tokenmill.cost.commands import usage_options
        from tokenmill.serve.server import serve, serve_fleet

        if args.config is not None:
            if args.model != "default" or args.profile != "auto":
                raise ValueError("--config: the models and their options are in the fleet file; "
                                 "leave --model and --profile out")  # fmt: skip
            names = set(option_help()) - {"model"}
            defaults = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
            return serve_fleet(args.config, serve_config(args), usage_options(args),
                               args.instance_hang_after, defaults, args.ray_address)  # fmt: skip
        if args.ray_address is not None:
            raise ValueError("--ray-address places a fleet's replicas: give --config FLEET.toml")
        return serve(engine_config(args), serve_config(args), usage_options(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
