"""Decode speed and memory per request against context length: Mamba-2 next to a transformer.

    python benchmarks/ssm_context.py --out benchmarks/results-ssm-context.json

Two random-weight models of about the same size, built once with `transformers` under
`--models`: a Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, MLP
1536: 135M parameters) and a Mamba-2 (24 layers, hidden 768, 24 heads of 64, state 128, one
group: 129M), both with SmolLM2's 49,152-token vocabulary, served in bf16. For each context
length one request: a prompt of that many tokens, then `--tokens` greedy tokens; decode
tokens/s is one over the median decode step (prefill excluded), with the two models interleaved
per context. Memory per request: the transformer's K/V for the context (bytes per token x
tokens) against the Mamba-2's fixed state (conv + SSM per layer); requests in flight: how many of
each fit in `--budget` bytes of cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm


def build(out: Path) -> dict[str, str]:
    import torch
    import transformers

    made = {}
    for name, config, cls in (
        ("llama-135m", transformers.LlamaConfig(
            hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=32768, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
        ), transformers.LlamaForCausalLM),
        ("mamba2-129m", transformers.Mamba2Config(
            hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, expand=2,
            state_size=128, n_groups=1, conv_kernel=4, chunk_size=256, vocab_size=49152,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ), transformers.Mamba2ForCausalLM),
    ):  # fmt: skip
        folder = out / name
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            cls(config).to(torch.bfloat16).save_pretrained(folder)
            tokenizer(folder)
        made[name] = str(folder)
    return made


def tokenizer(folder: Path) -> None:
    """The bundled SmolLM2's tokenizer (its vocabulary is the models')."""
    from tokenmill.models.loader import load_tokenizer

    tok = load_tokenizer("default")
    backend = getattr(tok, "backend", None)
    if backend is None or not hasattr(backend, "save"):
        raise SystemExit("needs a tokenizers.Tokenizer from the bundled model")
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    )


def decode_tok_s(engine, context: int, tokens: int, salt: int) -> tuple[float, float]:
    """(decode tokens/s, prefill seconds) of one request."""
    from tokenmill.sampling_params import SamplingParams

    vocab = engine.core.info.vocab_size
    ids = [(31 * i + salt) % (vocab - 10) + 5 for i in range(context)]
    engine.add_request(f"c{context}-{salt}", ids, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))  # fmt: skip
    steps, prefill, started = [], 0.0, time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if outs and len(outs[0].outputs[0].token_ids) > 1:
            steps.append(dt)
        elif outs:
            prefill = time.perf_counter() - started
    return 1 / statistics.median(steps), prefill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--contexts", default="256,1024,4096,16384")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--budget", type=int, default=1 << 30, help="cache bytes for requests in flight")
    p.add_argument("--models", type=Path, default=Path("/tmp/ssm-bench-models"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from tokenmill.bench.offline import commit, machine
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.kv.specs import bytes_per_state, bytes_per_token

    contexts = [int(c) for c in args.contexts.split(",")]
    longest = max(contexts) + args.tokens + 8
    paths = build(args.models)
    engines, per_request = {}, {}
    for name, path in paths.items():
        memory = 2 * longest * 30 * 2 * 3 * 64 * 2  # two full-length transformer sequences
        e = LLMEngine(EngineConfig.from_kwargs(model=path, dtype="bfloat16", max_model_len=longest,
                                               max_num_seqs=2, kv_cache_memory=memory))  # fmt: skip
        specs = e.executor.cache_specs()
        per_request[name] = (bytes_per_token(specs), bytes_per_state(specs))
        decode_tok_s(e, 16, 4, salt=999)  # warm-up
        engines[name] = e
    rows = []
    for context in tqdm(contexts, desc="contexts"):
        row = {"context": context}
        for name, e in engines.items():
            tok_s, prefill_s = decode_tok_s(e, context, args.tokens, salt=context)
            per_token, state = per_request[name]
            mem = per_token * (context + args.tokens) + state
            row[name] = {"decode_tokens_per_s": tok_s, "prefill_s": prefill_s,
                         "bytes_per_request": mem, "requests_in_budget": args.budget // mem}  # fmt: skip
        rows.append(row)
    print(f"{machine()}, commit {commit()}; decode tok/s (batch 1), cache bytes per request, "
          f"requests in {args.budget / 2**30:.1f} GiB")  # fmt: skip
    names = list(engines)
    print(f"{'context':>8} " + " ".join(f"{n:>44}" for n in names))
    for row in rows:
        cells = [f"{row[n]['decode_tokens_per_s']:7.1f} tok/s {row[n]['bytes_per_request'] / 2**20:9.2f} MiB {row[n]['requests_in_budget']:7d} req" for n in names]  # fmt: skip
        print(f"{row['context']:>8} " + " ".join(f"{c:>44}" for c in cells))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
                                        "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
