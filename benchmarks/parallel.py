"""Tensor and pipeline parallelism on this machine, measured next to the interconnect model's
prediction.

    python benchmarks/parallel.py --out benchmarks/results-parallel.json

A model of the bundled SmolLM2-135M's size and shape whose heads split two ways (its own 9
heads and 3 KV heads do not: `tensor_parallel_size 2` refuses it by name): hidden 576, 30
layers, 8 heads of 72 and 4 KV heads, MLP 1536, a tied 49152-token vocabulary, random weights
(bf16), built once with `transformers` beside the bundled tokenizer. One decode step at a time: `--batch` sequences of a
`--prompt`-token prompt, `--tokens` greedy tokens each; the step time is the median of the
decode steps (prefill excluded), over `--rounds` rounds with the configurations interleaved
(this machine drifts). Configurations: TP=1 on 2 threads (native kernels: the engine as it
serves), TP=1 with torch's ops on 1 thread (what one rank of TP=2 runs: it calibrates the
model's per-chip efficiency), TP=2 (two ranks of 1 thread each over Gloo, torch's ops), PP=2
(two stages of 1 thread, the step's batch in micro-batches through them; the model's "sync"
schedule, since each engine step drains the pipeline).
Next to them, `bench scaling`'s prediction for the same step: a `cpu-1core` chip whose bandwidth
efficiency is the one the TP=1 1-thread run reached, the `gloo-loopback` link measured by
benchmarks/allreduce.py. On 2 cores TP=2 is a correctness and overhead figure, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

CONFIGS = {
    "tp1-native-2t": {"tensor_parallel_size": 1, "num_threads": 2},
    "tp1-torch-1t": {"tensor_parallel_size": 1, "num_threads": 1, "cpu_kernels": "torch"},
    "tp2-torch": {"tensor_parallel_size": 2},
    "pp2-torch": {"pipeline_parallel_size": 2},
}


def decode_step_s(engine, batch: int, prompt: int, tokens: int, salt: int) -> float:
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    vocab = engine.core.info.vocab_size
    for b in range(batch):
        ids = [(17 * i + 31 * b + salt) % (vocab - 10) + 5 for i in range(prompt)]
        engine.add_request(f"r{salt}-{b}", ids, params)
    times, last = [], None
    while engine.has_unfinished():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if last is not None and all(len(o.outputs[0].token_ids) > 1 for o in outs):
            times.append(dt)  # a decode step (every sequence past its first token)
        last = outs
    return statistics.median(times)


def shaped_model(out: Path) -> str:
    """The SmolLM2-sized, 2-way-splittable random model (made once)."""
    if (out / "model.safetensors").is_file():
        return str(out)
    import shutil

    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=4,
        head_dim=72, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok = Path("/tmp/smollm2-hf")  # the bundled model as an HF folder: its tokenizer
    if not (tok / "tokenizer.json").is_file():
        raise SystemExit("needs /tmp/smollm2-hf: python benchmarks/peers/export_default.py /tmp/smollm2-hf")  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, out / name)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", type=Path, default=Path("/tmp/tp-smollm2-shaped"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    model = shaped_model(args.model)
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine import LLMEngine

    common = {"model": model, "dtype": "bfloat16", "max_model_len": 1024,
              "kv_cache_memory": 64 << 20, "enable_prefix_caching": False}  # fmt: skip
    engines = {n: LLMEngine(EngineConfig.from_kwargs(**common, **c)) for n, c in CONFIGS.items()}
    for e in engines.values():  # warm-up
        decode_step_s(e, args.batch, 16, 4, salt=999)
    steps: dict[str, list[float]] = {n: [] for n in engines}
    for r in tqdm(range(args.rounds), desc="rounds"):
        for n, e in engines.items():
            steps[n].append(decode_step_s(e, args.batch, args.prompt, args.tokens, salt=r))
    for e in engines.values():
        e.executor.shutdown()
    measured = {n: statistics.median(v) for n, v in steps.items()}

    from tokenmill.bench.scaling import load_catalog, shape_of, step

    cat = load_catalog()
    shape, links = shape_of(model, cat), cat["links"]
    context = args.prompt + args.tokens // 2
    one_core = cat["devices"]["cpu-1core"]
    ideal = step(shape, replace(one_core, bandwidth_efficiency=1.0, compute_efficiency=1.0),
                 links["gloo-loopback"], links, 1, mode="decode", batch=args.batch, context=context)  # fmt: skip
    eff = ideal.step_s / measured["tp1-torch-1t"]  # what the torch path reaches of the roofline
    chip = replace(one_core, bandwidth_efficiency=eff, compute_efficiency=eff)
    predicted = {
        "tp1-torch-1t": step(shape, chip, links["gloo-loopback"], links, 1, mode="decode",
                             batch=args.batch, context=context).step_s,
        "tp2-torch": step(shape, chip, links["gloo-loopback"], links, 2, mode="decode",
                          batch=args.batch, context=context).step_s,
        "pp2-torch": step(shape, chip, links["gloo-loopback"], links, 1, 2, mode="decode",
                          batch=args.batch, context=context, schedule="sync").step_s,
    }  # fmt: skip
    two = step(shape, chip, links["gloo-loopback"], links, 2, mode="decode", batch=args.batch, context=context)  # fmt: skip
    print(f"decode step, batch {args.batch}, context ~{context} (median of {args.rounds} rounds)")
    for n, s in measured.items():
        pred = predicted.get(n)
        extra = f"   predicted {pred * 1e3:7.2f} ms ({pred / s:.2f}x)" if pred else ""
        print(f"{n:16} {s * 1e3:7.2f} ms  {1 / s * args.batch:7.1f} tok/s{extra}")
    print(f"per-chip efficiency calibrated from tp1-torch-1t: {eff:.2f}; TP=2 all-reduces "
          f"{two.allreduce_s * 1e3:.1f} ms of the predicted {two.step_s * 1e3:.1f} ms")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "steps_s": steps,
                                        "median_s": measured, "predicted_s": predicted,
                                        "efficiency": eff, "allreduce_s": two.allreduce_s,
                                        "date": time.strftime("%Y-%m-%d")}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
