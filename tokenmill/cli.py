"""`tokenmill serve | generate`: the command line. Engine options come from the config docs."""

from __future__ import annotations

import argparse
import logging
import sys
import types
from typing import Any, Union, get_args, get_origin

from tokenmill.config import EngineConfig, option_help


def _arg_type(annotation: Any) -> Any:
    text = str(annotation)
    for name, kind in (("bool", bool), ("float", float), ("int", int), ("str", str)):
        if text.startswith(name) or f"{name} |" in text:
            return kind
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return str


def add_engine_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("engine options")
    for name, (text, default, annotation) in option_help().items():
        flag = "--" + name.replace("_", "-")
        kind = _arg_type(annotation)
        if name == "model":
            continue
        if kind is bool:
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{text} (default: {default})",
            )
        else:
            group.add_argument(flag, type=kind, default=None, help=f"{text} (default: {default})")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = set(option_help()) - {"model"}
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
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
    s.add_argument("--served-model-name", default=None, help="name clients use in 'model'")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body")
    add_engine_options(s)

    g = sub.add_parser("generate", help="complete one prompt, streaming to the terminal")
    g.add_argument("prompt", help="the prompt (or the user message with --chat)")
    g.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    add_engine_options(g)
    return p


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
    try:
        if args.command == "generate":
            return cmd_generate(args)
        from tokenmill.serve.server import serve

        serve(
            engine_config(args),
            args.host,
            args.port,
            args.served_model_name,
            args.api_key,
            args.max_waiting,
            args.grace_period,
            args.max_body_bytes,
        )
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
