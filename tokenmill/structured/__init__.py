"""Structured outputs: grammar-constrained decoding with llguidance.

`grammar.py` turns a request's StructuredOutputsParams into an llguidance grammar and validates
it (the front: a bad schema is a 400 naming the field); `manager.py` holds the engine core's
matchers: compiled off the step loop, cached by spec, advanced by each sampled token, and asked
for one token bitmask per step for every constrained row of the batch.

Why llguidance (over xgrammar; measured in BENCHMARKS.md, "Grammar engines"): it has no
dependencies (xgrammar pulls triton, transformers and tvm-ffi), compiles a schema in ~1.5 ms with
no warm-up, and refuses the JSON-schema keywords it cannot enforce (`not`, `uniqueItems`, `if`,
`contains`...) where xgrammar accepted them and let invalid output through. Its masks cost more
per token (~30 us vs ~3 us median on a 49k vocabulary), which is far below a decode step.
"""
