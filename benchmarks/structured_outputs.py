"""The per-token cost of structured outputs: a JSON-schema request against an unconstrained one
of the same length, on the bundled model, side by side in one run (rounds interleaved).

    python benchmarks/structured_outputs.py [--batch 1 8] [--rounds 3]

Constrained: a chat prompt answered under a schema that forces a long JSON array (12 objects).
Unconstrained: the same prompt, ignore_eos, as many tokens as the constrained answers had.
Reported per batch size: median time per output token (TPOT, decode steps) of each, their ratio,
and the grammar work per step in the engine core (mask fill + token accept, measured inside
the core), first-request compile time, and a cached compile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tqdm.auto import tqdm

SCHEMA = {
    "type": "array",
    "minItems": 12,
    "maxItems": 12,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99},
            "name": {"type": "string", "maxLength": 12},
            "city": {"enum": ["Paris", "Rome", "Oslo", "Lima", "Kyoto"]},
            "active": {"type": "boolean"},
        },
        "required": ["id", "name", "city", "active"],
        "additionalProperties": False,
    },
}
PROMPT = "List twelve people with an id, a name, a city and whether they are active, as JSON."


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    from tokenmill import LLM, SamplingParams, StructuredOutputsParams
    from tokenmill.bench.ab import emit
    from tokenmill.bench.offline import commit, machine

    llm = LLM(dtype=args.dtype, max_model_len=1024, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    core = llm.engine.core
    grammar_s: list[float] = []  # seconds of grammar work per constrained step

    def timed(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                grammar_s[-1] += time.perf_counter() - t

        return run

    core._with_bitmask = timed(core._with_bitmask)
    core._advance_grammars = timed(core._advance_grammars)
    step = core.step

    def counted_step():
        grammar_s.append(0.0)
        return step()

    core.step = counted_step

    constraint = StructuredOutputsParams(json=SCHEMA)
    t = time.perf_counter()
    core.structured.compile(constraint).result()
    first_compile = time.perf_counter() - t  # includes building the grammar tokenizer
    other = StructuredOutputsParams(json={**SCHEMA, "minItems": 11})
    t = time.perf_counter()
    core.structured.compile(other).result()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    core.structured.compile(constraint).result()
    cached_s = time.perf_counter() - t

    def run(batch: int, constrained: bool, length: int) -> tuple[list[float], list[int], float]:
        params = [
            SamplingParams(max_tokens=600, temperature=0.7, seed=i, structured_outputs=constraint)
            if constrained
            else SamplingParams(max_tokens=length, temperature=0.7, seed=i, ignore_eos=True)
            for i in range(batch)
        ]
        grammar_s.clear()
        outs = llm.generate([prompt] * batch, params, use_tqdm=False)
        tpots = [o.metrics.tpot for o in outs if o.metrics and o.metrics.tpot]
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        if constrained:
            for o in outs:
                assert len(json.loads(o.outputs[0].text)) == 12
        steps = [s for s in grammar_s if s > 0]
        return tpots, lengths, statistics.median(steps) if steps else 0.0

    results = []
    bar = tqdm(total=len(args.batch) * args.rounds * 2, desc="runs", unit="run")
    for batch in args.batch:
        tp = {"json_schema": [], "unconstrained": []}
        per_step, lengths = [], []
        for _ in range(args.rounds):
            t_c, n_c, g = run(batch, True, 0)
            bar.update()
            t_u, _, _ = run(batch, False, int(statistics.median(n_c)))
            bar.update()
            tp["json_schema"] += t_c
            tp["unconstrained"] += t_u
            per_step.append(g)
            lengths += n_c
        c, u = statistics.median(tp["json_schema"]), statistics.median(tp["unconstrained"])
        results.append(
            {
                "batch": batch,
                "output_tokens_median": statistics.median(lengths),
                "tpot_ms_json_schema": round(c * 1e3, 3),
                "tpot_ms_unconstrained": round(u * 1e3, 3),
                "ratio": round(c / u, 3),
                "grammar_ms_per_step_median": round(statistics.median(per_step) * 1e3, 3),
            }
        )
    bar.close()
    emit(
        {
            "machine": machine(),
            "commit": commit(),
            "date": time.strftime("%Y-%m-%d"),
            "first_compile_ms_with_tokenizer": round(first_compile * 1e3, 1),
            "compile_ms": round(compile_s * 1e3, 2),
            "cached_compile_ms": round(cached_s * 1e3, 3),
            "results": results,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
