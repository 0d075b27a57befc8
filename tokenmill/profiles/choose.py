"""Hardware profiles (as NIM picks one): for a model on a machine, the candidate engine
configurations (dtype, quantization, KV cache dtype and budget, batch limits, tensor-parallel
size), whether each fits, why, and the one chosen. Pure: it reads a `Hardware` value and the
model's tensor sizes, nothing else; the speed notes quote BENCHMARKS.md's measurements.

The chosen one is the first that fits in this order: on CPU bf16 where the CPU multiplies bf16
natively (AVX512-BF16 / AMX: the fastest offline and to the first token here), else fp32; then
int8 and int4 weight-only (and a GGUF file's own codes) when the weights do not fit. On a GPU bf16, then fp8 (E4M3 tensor
cores, compute capability 8.9+), then w8a8 and int4. Faster single-stream profiles (int4, the
GGUF file's own codes) are listed beside it and taken with `--profile NAME`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.profiles.hardware import Hardware

GB = 1 << 30
BITS = {None: None, "int8": 8, "w8a8": 8, "fp8": 8, "int4": 4.625, "nvfp4": 4.5}
CPU_KV_CAP = 4 * GB  # the engine's default KV budget on CPU (config.CacheConfig)
HEADROOM = 0.8  # of the memory: weights + KV budget may take this much


@dataclass(frozen=True)
class ModelSize:
    """A model's tensors: elements of the linear layers' weights, of everything else, and a GGUF
    file's size when it is one (its own codes can be served)."""

    linear: int
    other: int
    gguf_bytes: int | None = None

    def weight_bytes(self, dtype_bytes: int, quantization: str | None) -> int:
        if quantization == "gguf":
            assert self.gguf_bytes is not None
            return self.gguf_bytes
        bits = BITS[quantization]
        linear = self.linear * (bits / 8 if bits else dtype_bytes)
        return int(linear + self.other * dtype_bytes)


@dataclass(frozen=True)
class Profile:
    name: str
    options: dict  # engine options by config name (what `--profile NAME` sets)
    weight_bytes: int
    fits: bool
    reasons: tuple[str, ...]
    tensor_parallel_size: int = 1
    chosen: bool = False


@dataclass(frozen=True)
class Choice:
    hardware: Hardware
    profiles: tuple[Profile, ...] = field(default_factory=tuple)

    @property
    def chosen(self) -> Profile:
        return next(p for p in self.profiles if p.chosen)

    def profile(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.profiles)
        raise ValueError(f"no profile {name!r} for this model and machine; candidates: {known}")


def choose(size: ModelSize, hw: Hardware) -> Choice:
    return _gpu(size, hw) if hw.gpus else _cpu(size, hw)


def _cpu(size: ModelSize, hw: Hardware) -> Choice:
    native = {"avx512f", "avx512bw", "avx512vl"} <= hw.cpu_flags  # the native kernels need it
    half = "bfloat16" if hw.cpu_bf16 else "float32"
    width = 2 if hw.cpu_bf16 else 4
    rows: list[tuple[str, dict, int, list[str]]] = []
    if hw.cpu_bf16:
        rows.append(("cpu-bf16", {"dtype": "bfloat16"}, 2, [
            "native bf16 matmuls (AVX512-BF16/AMX): the fastest offline and time to first token "
            "here (BENCHMARKS.md: 2.2x fp32 offline)"]))  # fmt: skip
    rows.append(("cpu-fp32", {"dtype": "float32"}, 4, [
        "exact reference precision" if hw.cpu_bf16 else
        "this CPU has no native bf16 matmul (no AVX512-BF16 / AMX): fp32 is faster than bf16"]))  # fmt: skip
    for method, note in (
        ("int8", "weight-only int8: 1.4x bf16's batch-1 decode, 0.8x its offline throughput"),
        ("int4", "weight-only int4 (GPTQ/AWQ-ready): the linear layers in 4.6 bits a weight, "
                 "1.5-1.8x bf16's batch-1 decode, 0.8x its offline throughput"),
    ):  # fmt: skip
        extra = [] if native else ["no AVX-512: torch's kernels, slower than bf16 (BENCHMARKS.md)"]
        rows.append((f"cpu-{method}", {"dtype": half, "quantization": method}, width, [note, *extra]))  # fmt: skip
    if size.gguf_bytes is not None:
        rows.append(("cpu-gguf", {"dtype": half, "quantization": "gguf"}, width, [
            "the GGUF file's own codes: its size in memory, 1.8x bf16's batch-1 decode, 0.9x "
            "its offline throughput"]))  # fmt: skip
    profiles = []
    for name, options, dtype_bytes, reasons in rows:
        weights = size.weight_bytes(dtype_bytes, options.get("quantization"))
        room = int(hw.memory_bytes * HEADROOM) - weights
        kv = min(CPU_KV_CAP, room)
        fits = kv >= min(CPU_KV_CAP, 256 << 20)  # at least a 256 MiB KV budget (or the cap)
        why = list(reasons)
        if fits and kv < CPU_KV_CAP:
            options = {**options, "kv_cache_memory": kv}
            why.append(f"KV budget {kv / GB:.2f} GB: what {HEADROOM:.0%} of memory leaves")
        elif fits:
            why.append(f"KV budget up to {CPU_KV_CAP / GB:.0f} GB (the CPU default)")
        else:
            why.append(f"does not fit: {weights / GB:.2f} GB of weights in {hw.memory_bytes / GB:.1f} GB")  # fmt: skip
        profiles.append(Profile(name, options, weights, fits, tuple(why)))
    return _pick(hw, profiles, ("cpu-bf16", "cpu-fp32", "cpu-int8", "cpu-int4", "cpu-gguf"))


def _gpu(size: ModelSize, hw: Hardware) -> Choice:
    g = hw.gpus[0]
    cap = g.capability
    rows: list[tuple[str, dict, int, str]] = []
    half = "bfloat16" if cap >= (8, 0) else "float16"
    plain = "cuda-bf16" if half == "bfloat16" else "cuda-fp16"
    rows.append((plain, {"dtype": half}, 2, f"{half} tensor cores (sm_{cap[0]}{cap[1]})"))
    if cap >= (8, 9):
        rows.append(("cuda-fp8", {"dtype": half, "quantization": "fp8"}, 2,
                     "E4M3 x E4M3 on FP8 tensor cores (torch._scaled_mm), half the weight memory"))  # fmt: skip
    if cap >= (8, 0):
        rows.append(("cuda-w8a8", {"dtype": half, "quantization": "w8a8"}, 2,
                     "int8 x int8 on IMMA tensor cores (torch._int_mm)"))  # fmt: skip
    rows.append(("cuda-int4", {"dtype": half, "quantization": "int4"}, 2,
                 "weight-only int4 through the Triton dequant-matmul kernels"))  # fmt: skip
    if cap >= (10, 0):
        rows.append(("cuda-nvfp4", {"dtype": half, "quantization": "nvfp4"}, 2,
                     "NVFP4 weights (Blackwell), through the Triton dequant-matmul kernels"))  # fmt: skip
    usable = int(g.memory_bytes * 0.9)  # gpu_memory_utilization's default
    profiles = []
    for name, options, dtype_bytes, reason in rows:
        weights = size.weight_bytes(dtype_bytes, options.get("quantization"))
        tp = 1
        while weights / tp > 0.8 * usable and tp < 64:
            tp *= 2
        why = [reason, "KV budget: what gpu_memory_utilization 0.9 leaves after the weights"]
        same = sum(1 for x in hw.gpus if x.memory_bytes >= g.memory_bytes)  # as large as GPU 0
        fits = tp <= same
        if g.mig:
            why.append("MIG mode: the instance gets a MIG device's memory (tokenmill partition plan)")  # fmt: skip
        if tp > 1 and fits:
            options = {**options, "tensor_parallel_size": tp}
            why.append(f"tensor_parallel_size={tp}: the weights split over {tp} of the {len(hw.gpus)} GPUs")  # fmt: skip
        elif tp > 1:
            why.append(f"needs tensor_parallel_size={tp}: {same} GPU(s) of this size here")
        profiles.append(Profile(name, options, weights, fits, tuple(why), tp))
    order = (plain, "cuda-fp8", "cuda-w8a8", "cuda-int4")
    return _pick(hw, profiles, order)


def _pick(hw: Hardware, profiles: list[Profile], order: tuple[str, ...]) -> Choice:
    by_name = {p.name: p for p in profiles}
    pick = next((n for n in order if n in by_name and by_name[n].fits), None)
    if pick is None:  # nothing fits: still choose the smallest, and say so
        pick = min(profiles, key=lambda p: p.weight_bytes).name
    out = [
        Profile(
            p.name,
            p.options,
            p.weight_bytes,
            p.fits,
            p.reasons,
            p.tensor_parallel_size,
            p.name == pick,
        )  # fmt: skip
        for p in profiles
    ]
    return Choice(hw, tuple(out))
