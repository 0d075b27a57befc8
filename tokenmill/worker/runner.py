"""ModelRunner: owns the model, the KV tensors, the sampler and its own request states; runs
one scheduled step.

It folds a `SchedulerOutput` into its persistent input batch (`worker/input_batch.py`), flattens
the step into one packed batch (`worker/batch.py`), runs the model once, computes logits only
where they are needed (the last token of requests that sample, every prompt position of requests
asking for prompt logprobs), and samples. Compile policy lives here too (`compile_model`).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from tokenmill.config import CacheConfig
from tokenmill.engine.messages import RunnerOutput, SampledToken, SchedulerOutput
from tokenmill.kv.specs import AttentionSpec, CacheSpec, StateSpec
from tokenmill.kv.storage.memory import Prefaulter, host_zeros
from tokenmill.layers import native
from tokenmill.layers.attention import AttentionMetadata, PrefillSpan, TorchAttention
from tokenmill.layers.kv_quant import (
    KV_DTYPES,
    STORAGE,
    QuantizedKVAttention,
    kv_bytes_per_element_and_token,
)
from tokenmill.layers.linear import Linear
from tokenmill.layers.native_ops import select_kernels
from tokenmill.layers.sampler import Sampler
from tokenmill.models.build import LoadedModel
from tokenmill.quant.calibrate import single_sequence_metadata
from tokenmill.worker.batch import build_model_input, build_sampling_batch
from tokenmill.worker.input_batch import InputBatch

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 4 << 30


def cache_specs(loaded: LoadedModel, kv_cache_dtype: str) -> list[CacheSpec]:
    """What each layer of the model caches: K/V per token in this dtype (attention), or a
    conv state and an SSM state in float32 per request (state-space)."""
    specs: list[CacheSpec] = []
    for num_kv_heads, head_dim in loaded.model.cache_layers():
        per_head = kv_bytes_per_element_and_token(kv_cache_dtype, loaded.dtype, head_dim)
        specs.append(AttentionSpec(num_kv_heads, head_dim, per_head))
    for shapes in getattr(loaded.model, "state_layers", list)():
        specs.append(StateSpec(tuple(shapes), (4, 4)))
    return specs


def default_kv_cache_memory(
    loaded: LoadedModel, cache: CacheConfig, bytes_per_token: int, max_tokens: int
) -> int:
    """The KV budget when none is given: see CacheConfig.kv_cache_memory."""
    needed = max_tokens * bytes_per_token
    if loaded.device.type == "cuda":
        _, total = torch.cuda.mem_get_info(loaded.device)
        used = torch.cuda.memory_allocated(loaded.device)
        headroom = 1 << 30  # activations and the sampler's temporaries
        budget = max(int(total * cache.gpu_memory_utilization) - used - headroom, 0)
        return min(needed, budget)  # more than the scheduler can ever fill would only idle
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(needed, CPU_DEFAULT_KV_BYTES, available // 4)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On CPU a lazily mapped one (kv.storage.memory.host_zeros): gigabytes of KV cache
    cost nothing at start-up (torch.zeros writes every page: 2.6 s/4 GiB)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return host_zeros(shape, dtype)


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheConfig,
        num_blocks: int,
        seed: int,
        num_threads: int | None = None,
        cpu_kernels: str = "auto",
        num_state_slots: int = 0,
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = cache.block_size
        self.kv_cache_dtype = cache.kv_cache_dtype
        self.num_blocks = num_blocks
        # One extra block at the end: padded key positions of a decode batch point at it. The
        # cache starts zeroed, so slots not yet written (the tail of a partial block, read whole
        # and masked) hold finite values: a masked NaN would still poison softmax(..) @ V.
        self.pad_slot = num_blocks * cache.block_size
        slots = (num_blocks + 1) * cache.block_size
        self.kv_caches = [  # each layer's (this rank's) KV heads
            self._allocate((2, kv_heads, slots, head_dim), cache.kv_cache_dtype)
            for kv_heads, head_dim in self.model.cache_layers()
        ]
        flat = [t for c in self.kv_caches for t in (c if isinstance(c, tuple) else (c,))]
        self.prefaulter = Prefaulter(flat).start()  # pages in ahead of use, in the background
        # state-space layers: each one's (conv, ssm) states per request slot; the model gets
        # the attention layers' caches, then these
        self.state_caches = [
            (zeros((num_state_slots, *conv), torch.float32, self.device),
             zeros((num_state_slots, *ssm), torch.float32, self.device))
            for conv, ssm in (self.model.state_layers() if num_state_slots else ())
        ]  # fmt: skip
        self.model_caches = self.kv_caches + self.state_caches
        self.cpu_kernels = select_kernels(
            self.model,
            cpu_kernels,
            self.device,
            loaded.dtype,
            attention=cache.kv_cache_dtype == "auto",  # a quantized cache keeps its own backend
        )
        log.info("CPU kernels: %s", self.cpu_kernels)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self.sampler = Sampler(gen)
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own generators
        self.batch_invariant = False  # make_batch_invariant
        self.input_batch = InputBatch()
        self._last: tuple | None = None  # the last step's requests and generator states (retry)
        self._bitmask = None  # the step's allowed tokens of constrained rows (retry keeps it)

    def compile_model(self) -> None:
        """The compile policy (config `compile`): each decoder layer's halves around attention
        go to torch.compile with dynamic shapes (one graph serves every batch size; the layers
        share graphs, their weights being inputs). Skipped, with a warning, where a quant
        method keeps Python state per call that a graph cannot (fp8 delayed scaling)."""
        if self.device.type == "cpu" and native.compiler() is None:
            raise RuntimeError(
                "compile on CPU builds C++ kernels and found no C++ compiler (g++, c++, clang++ "
                "or $CXX); install one (apt install g++) or run without --compile"
            )
        linears = [m for m in self.model.modules() if isinstance(m, Linear)]
        if not all(m.quant_method.compilable for m in linears):
            log.warning("compile skipped: a quant method keeps per-call Python state; eager mode")
            return
        # A few graphs per half (first layer or not, one row or many, prefill or decode
        # attention layouts), times the engines of one process: above dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for unit in self.model.compile_units():
            unit.compile_with(functools.partial(torch.compile, dynamic=True))
        log.info("decoder layers handed to torch.compile; the warm-up builds their graphs")

    def make_batch_invariant(self) -> None:
        """The batch-invariant policy (config `batch_invariant`): every linear layer and the LM
        head on the invariant GEMM (layers/invariant.py: each output one fixed chain of sums,
        whatever the number of rows; library GEMMs change their blocking with it), and
        attention per token on the native decode kernel (a token's keys in block order, one
        work item per sequence and head). What else shares a step then changes nothing in a
        row's arithmetic; the norms and activations are row-wise already."""
        if self.device.type != "cpu":
            raise ValueError("batch_invariant is built for CPU; this engine runs on "
                             f"{self.device.type}")  # fmt: skip
        if self.cpu_kernels != "native" or self.kv_cache_dtype != "auto":
            raise ValueError(
                "batch_invariant needs the native CPU kernels (float32 or bfloat16, an "
                f"unquantized KV cache); this engine has {self.cpu_kernels!r} kernels and "
                f"kv_cache_dtype {self.kv_cache_dtype!r}"
            )
        linears = [m for m in self.model.modules() if isinstance(m, Linear)]
        quantized = {type(m.quant_method).__name__ for m in linears} - {"UnquantizedMethod"}
        if quantized:
            raise ValueError(
                f"batch_invariant takes unquantized weights; this model has {sorted(quantized)}"
            )
        for module in linears:
            module.quant_method.make_invariant(module)
        self.model.make_head_invariant()
        self.batch_invariant = True
        log.info("batch-invariant: invariant GEMMs, attention per token")

    def _allocate(self, shape: tuple[int, ...], kv_cache_dtype: str):
        """One layer's KV cache; a quantized one is (codes, scales) and swaps the attention
        backends of the model to read it."""
        if kv_cache_dtype == "auto":
            return zeros(shape, self.loaded.dtype, self.device)
        kv_dtype = KV_DTYPES[kv_cache_dtype]
        for module in self.model.modules():
            backend = getattr(module, "backend", None)
            if isinstance(backend, TorchAttention) and not isinstance(
                backend, QuantizedKVAttention
            ):
                module.backend = QuantizedKVAttention(backend.scale, kv_dtype, self.loaded.dtype)
        codes = zeros(shape, STORAGE[kv_dtype], self.device)
        return codes, zeros((*shape[:-1], 1), torch.float32, self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for request_id in out.finished_request_ids:  # a preempted one keeps its generator
            self.generators.pop(request_id, None)
        self._last = None
        self._bitmask = out.grammar_bitmask
        scheduled = self.input_batch.apply(out)
        if not scheduled:
            return RunnerOutput()
        self._copy_blocks(out.block_copies)
        for src, dst in out.state_copies:  # an n > 1 fork: each child from the parent's state
            for t in (t for pair in self.state_caches for t in pair):
                t[dst] = t[src]
        ids = [s.state.request_id for s in scheduled]
        saved = {r: self.generators[r].get_state() for r in ids if r in self.generators}
        self._last = (scheduled, saved)
        return self._run(scheduled)

    @torch.inference_mode()
    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        """Run the last step again for these of its requests only (after it failed): their
        state is applied already, their K/V rewritten in place, and their seeded generators
        put back where the step found them, so they sample as a run without the others."""
        if self._last is None:
            raise RuntimeError("no step to retry")
        scheduled, saved = self._last
        wanted = set(request_ids)
        subset = [s for s in scheduled if s.state.request_id in wanted]
        for s in subset:
            r = s.state.request_id
            if r in saved:
                self.generators[r].set_state(saved[r])
            else:
                self.generators.pop(r, None)  # made during the failed attempt: made again
        return self._run(subset)

    def _run(self, scheduled) -> RunnerOutput:
        from tokenmill.parallel.group import current_stage

        stage = current_stage()
        if stage.size > 1:
            return self._run_stage(stage, scheduled)
        inp = build_model_input(
            scheduled, self.block_size, self.pad_slot, self.device, self.batch_invariant
        )
        hidden = self.model(inp.input_ids, inp.positions, self.model_caches, inp.attn)
        return self._outputs(inp, hidden)

    def _run_stage(self, stage, scheduled) -> RunnerOutput:
        """A pipeline stage's part of the step: the batch in micro-batches (as many as stages,
        at most one a request), each received from the previous stage (hidden and residual),
        run through this stage's layers and sent on without waiting, so that the stages work
        on different micro-batches at once; the last stage samples. Every rank derives the
        same micro-batches and shapes from the scheduler's output."""
        m = min(stage.size, len(scheduled))
        bounds = [len(scheduled) * i // m for i in range(m + 1)]
        hidden_size, dtype = self.loaded.arch.hidden_size, self.loaded.dtype
        pending, outs = [], []
        for lo, hi in zip(bounds, bounds[1:]):
            inp = build_model_input(
                scheduled[lo:hi], self.block_size, self.pad_slot, self.device, self.batch_invariant
            )
            carried = None
            if not stage.first:
                n = inp.input_ids.numel()
                carried = (torch.empty(n, hidden_size, dtype=dtype, device=self.device),
                           torch.empty(n, hidden_size, dtype=dtype, device=self.device))  # fmt: skip
                stage.receive(list(carried))
            result = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.attn, carried)
            if stage.last:
                outs.append(self._outputs(inp, result))
            else:
                pending += [(h, result) for h in stage.send(list(result))]  # keep them alive
        for handle, _ in pending:
            handle.wait()
        if not stage.last:
            return RunnerOutput()
        merged = RunnerOutput()
        for o in outs:
            merged.sampled.update(o.sampled)
            merged.prompt_logprobs.update(o.prompt_logprobs)
            merged.pooled.update(o.pooled)
            merged.prompt_ranks.update(o.prompt_ranks)
        return merged

    def _outputs(self, inp, hidden) -> RunnerOutput:
        """Sampled tokens, prompt logprobs and pooled vectors from the final hidden states."""
        sampled: dict[str, SampledToken] = {}
        if inp.sample_states:
            logits = self.model.compute_logits(hidden[inp.logits_indices])
            batch = build_sampling_batch(
                inp.sample_states,
                self.generators,
                self.loaded.eos_token_ids,
                self.device,
                self._bitmask,
            )
            result = self.sampler(logits, batch)
            for state, token, lps in zip(inp.sample_states, result.token_ids, result.logprobs):
                sampled[state.request_id] = SampledToken(token, lps)
        prompt_logprobs, prompt_ranks = self._prompt_logprobs(hidden, inp.prompt_logprob_spans)
        pooled, sums = self._pool(hidden, inp.pool_spans)
        for span in inp.prompt_logprob_spans:  # counted once the whole step succeeded
            span.state.num_prompt_logprobs += len(prompt_logprobs[span.state.request_id])
        for state, total in sums:  # likewise: a retried step must not add its rows twice
            state.pool_sum = total
        return RunnerOutput(sampled, prompt_logprobs, pooled, prompt_ranks)

    @staticmethod
    def _pool(hidden, spans):
        """Embedding requests: the final hidden state of the prompt's last token, or the mean
        over its tokens (summed chunk by chunk); a vector once the prompt is done."""
        pooled, sums = {}, []
        for span in spans:
            state, rows = span.state, hidden[span.start : span.end].float()
            if state.params.pooling == "last":
                vector = rows[-1] if span.last else None
            else:
                total = rows.sum(0) if state.pool_sum is None else state.pool_sum + rows.sum(0)
                sums.append((state, total))
                vector = total / state.num_prompt_tokens if span.last else None
            if vector is not None:
                pooled[state.request_id] = tuple(vector.tolist())
        return pooled, sums

    @torch.inference_mode()
    def score(
        self, token_ids: list[int], tier_dtype: str | None = None, history: int = 0
    ) -> torch.Tensor:  # [n, vocab] fp32
        """Logits after each token of one sequence, on a scratch KV cache of its own (the
        engine's blocks are untouched), through the same layers and KV storage as serving.
        For evaluation with the engine idle.

        With `tier_dtype`, the first `history` tokens (whole blocks) are computed first, their
        blocks go down to a host tier of that format and back (kv/storage's code, as a
        returning conversation's do), and the rest is computed over what came back."""
        n = len(token_ids)
        padded = -(-n // self.block_size) * self.block_size
        caches = [
            self._allocate((2, kv_heads, padded, head_dim), self.kv_cache_dtype)
            for kv_heads, head_dim in self.model.cache_layers()
        ]
        states = [  # state-space layers: a scratch state of its own too
            (zeros((1, *conv), torch.float32, self.device),
             zeros((1, *ssm), torch.float32, self.device))
            for conv, ssm in getattr(self.model, "state_layers", list)()
        ]  # fmt: skip
        ids = torch.tensor(token_ids, device=self.device)
        if tier_dtype is not None:
            if states or history % self.block_size or not 0 < history < n:
                raise ValueError(
                    f"a tier round trip needs an attention model and 0 < history < {n} tokens "
                    f"in whole blocks of {self.block_size}, got {history}"
                )
            return self._score_after_tier(ids, caches, tier_dtype, history)
        meta = single_sequence_metadata(n, self.block_size, self.device)
        if states:
            from dataclasses import replace

            from tokenmill.layers.mamba import SSMBatch, SSMSequence

            meta = replace(meta, ssm=SSMBatch.of([SSMSequence(0, n, 0, True)], self.device))
        hidden = self.model(ids, torch.arange(n, device=self.device), caches + states, meta)
        return self.model.compute_logits(hidden).float()

    def _score_after_tier(self, ids, caches, tier_dtype: str, history: int) -> torch.Tensor:
        from tokenmill.kv.storage.host import BlockCodec, BlockViews, HostBlocks

        n, h, dev = len(ids), history, self.device
        first = self.model(
            ids[:h], torch.arange(h, device=dev), caches, single_sequence_metadata(h, self.block_size, dev)
        )  # fmt: skip
        views = BlockViews(caches, self.block_size)
        blocks = list(range(h // self.block_size))
        tier = HostBlocks(views, len(blocks), BlockCodec(views.block_shapes(), tier_dtype))
        tier.save(blocks, blocks)
        tier.restore(blocks, blocks)
        mask = torch.arange(n)[None, :] <= torch.arange(h, n)[:, None]  # [n - h, n]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(h, n, device=dev),
            num_decode_tokens=0,
            block_size=self.block_size,
            decode_block_tables=None,
            decode_mask=None,
            prefills=[PrefillSpan(0, n - h, h, torch.arange(n, device=dev), mask.to(dev))],
        )
        rest = self.model(ids[h:], torch.arange(h, n, device=dev), caches, meta)
        return self.model.compute_logits(torch.cat([first, rest])).float()

    def _prompt_logprobs(self, hidden, spans):
        """Per prompt position p >= 1: {token p: logprob, top-k}, from the logits at p - 1,
        one batched log_softmax per span; and token p's rank there (1: the most likely)."""
        out, ranks = {}, {}
        for span in spans:
            req, start, first_pos = span.state, span.start, span.first_position
            n = min(span.end - start, req.num_prompt_tokens - 1 - first_pos)  # have a next token
            entries: list[dict[int, float] | None] = [None] if first_pos == 0 else []
            rank_list: list[int | None] = [None] if first_pos == 0 else []
            if n > 0:
                lp = self.model.compute_logits(hidden[start : start + n]).float().log_softmax(-1)
                targets = req.all_token_ids[first_pos + 1 : first_pos + 1 + n]
                chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0]
                rank_list += ((lp > chosen[:, None]).sum(-1) + 1).tolist()
                k = req.params.prompt_logprobs or 0
                top = lp.topk(k, dim=-1) if k else None
                for i, (t, v) in enumerate(zip(targets, chosen.tolist())):
                    entry = {t: v}
                    if top is not None:
                        for tid, val in zip(top.indices[i].tolist(), top.values[i].tolist()):
                            entry.setdefault(tid, val)
                    entries.append(entry)
            out[req.request_id] = entries
            ranks[req.request_id] = rank_list
        return out, ranks

    def _copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        bs = self.block_size
        tensors = [t for c in self.kv_caches for t in (c if isinstance(c, tuple) else (c,))]
        for src, dst in copies:
            for t in tensors:  # slots are dimension 2 of K/V tensors and of their scales
                t[:, :, dst * bs : (dst + 1) * bs] = t[:, :, src * bs : (src + 1) * bs]
