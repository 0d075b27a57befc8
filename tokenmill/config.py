"""Engine configuration: one frozen dataclass per subsystem, composed into `EngineConfig`.

Each field carries its documentation in `metadata["help"]`; the CLI builds its `--help` from it.
Validation happens once, in `__post_init__`, with errors that say what to do. This module imports
no torch: sizes that depend on the device (the KV budget on CUDA) are resolved by the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from tokenmill.config_quant import FORMATS, QUANTIZATIONS, QUANTIZERS, QuantConfig, doc_field

__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "QUANTIZERS",
    "CacheConfig",
    "DeviceConfig",
    "EngineConfig",
    "ModelConfig",
    "QuantConfig",
    "SchedulerConfig",
    "ServeConfig",
    "option_help",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
CPU_KERNELS = ("auto", "torch", "native")  # layers/native_ops.py CHOICES


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how."""

    model: str = doc_field(
        "A local Hugging Face folder, a .gguf file, or 'default' for the bundled SmolLM2-135M-Instruct.",
        default="default",
    )
    dtype: str = doc_field(
        "Weight and activation dtype: float32, bfloat16, float16, or auto: the checkpoint's "
        "half type on CUDA; on CPU bfloat16 where it has native bf16 matmuls (AVX512-BF16, AMX), "
        "else float32.",
        default="auto",
    )
    max_model_len: int | None = doc_field(
        "Longest prompt + completion in tokens; default: the model's max_position_embeddings.",
        default=None,
    )
    seed: int = doc_field("Seed of the engine's random generator (unseeded sampling).", default=0)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = doc_field("Tokens per KV block.", default=16)
    kv_cache_memory: int | None = doc_field(
        "Bytes for the KV cache; default: enough for max_num_seqs full-length sequences, "
        "at most gpu_memory_utilization of the device less the weights on CUDA, at most "
        "4 GiB on CPU.",
        default=None,
    )
    gpu_memory_utilization: float = doc_field(
        "Fraction of CUDA device memory that weights + KV cache may take.", default=0.9
    )
    enable_prefix_caching: bool = doc_field(
        "Reuse KV blocks of identical prompt prefixes across requests.", default=True
    )
    kv_cache_dtype: str = doc_field(
        "KV cache storage: auto (the model dtype), int8 or fp8_e4m3 (one scale per token and "
        "head; about half the bytes of bf16, so twice the tokens fit). On CPU int8 is the fast one.",
        default="auto",
    )
    kv_host_memory: int = doc_field(
        "Bytes of host memory for KV blocks evicted from the pool (0 = off): a returning "
        "prefix is loaded back instead of recomputed. Pinned on CUDA. Per rank with tensor or "
        "pipeline parallelism (each holds its shard of every block).",
        default=0,
    )
    kv_disk_dir: str | None = doc_field(
        "Directory for a disk KV tier below host memory; it survives restarts (one server "
        "per directory: it is locked). With several ranks, each keeps its shards in its own "
        "subdirectory (rank<r>-tp<T>-pp<P>).",
        default=None,
    )
    kv_disk_memory: int | None = doc_field(
        "Bytes the disk KV tier may take (per rank with several ranks); default with "
        "kv_disk_dir: 8 GiB, at most half the directory's free space (shared by the ranks).",
        default=None,
    )
    kv_tier_dtype: str = doc_field(
        "Blocks in the host and disk tiers: auto (as the pool holds them: bit-exact) or int8 / "
        "fp8_e4m3 (compressed, one scale per token and head: about 1.9x the tokens in the same "
        "bytes of a bf16 cache, at a perplexity cost; see BENCHMARKS.md).",
        default="auto",
    )
    kv_tier_policy: str = doc_field(
        "Which block a full KV tier lets go: s3fifo (new blocks pass through a small queue, "
        "blocks used again stay; on multi-turn chat 2.2x the hits of lru at the same size, "
        "BENCHMARKS.md) or lru (the least recently used).",
        default="s3fifo",
    )

    @property
    def has_tiers(self) -> bool:
        return bool(self.kv_host_memory or self.kv_disk_dir)

    def __post_init__(self) -> None:
        if self.kv_host_memory < 0:
            raise ValueError(f"kv_host_memory must be >= 0 bytes, got {self.kv_host_memory}")
        if self.kv_disk_memory is not None and self.kv_disk_memory <= 0:
            raise ValueError(f"kv_disk_memory must be > 0 bytes, got {self.kv_disk_memory}")
        if self.kv_disk_memory is not None and not self.kv_disk_dir:
            raise ValueError("kv_disk_memory sizes the disk KV tier: set kv_disk_dir too")
        if self.kv_tier_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_tier_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_tier_dtype!r}"
            )
        if self.kv_tier_policy not in ("s3fifo", "lru"):
            raise ValueError(f"kv_tier_policy must be s3fifo or lru, got {self.kv_tier_policy!r}")
        if self.kv_tier_policy != "s3fifo" and not self.has_tiers:
            raise ValueError("kv_tier_policy chooses what the KV tiers keep: set kv_host_memory or kv_disk_dir too")  # fmt: skip
        if self.kv_tier_dtype != "auto" and not self.has_tiers:
            raise ValueError("kv_tier_dtype sets the KV tiers' format: set kv_host_memory or kv_disk_dir too")  # fmt: skip
        if self.kv_tier_dtype != "auto" and self.kv_cache_dtype != "auto":
            raise ValueError(
                f"kv_tier_dtype={self.kv_tier_dtype} compresses a 16- or 32-bit KV cache; this "
                f"one is kv_cache_dtype={self.kv_cache_dtype} already, so its tiers hold its "
                "blocks as they are: drop kv_tier_dtype"
            )
        if self.has_tiers and not self.enable_prefix_caching:
            raise ValueError(
                "the KV tiers (kv_host_memory, kv_disk_dir) hold cached prefixes: they need "
                "enable_prefix_caching"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = doc_field("Most sequences running in one step.", default=64)
    max_num_batched_tokens: int = doc_field("Most tokens computed in one step.", default=2048)
    enable_chunked_prefill: bool = doc_field(
        "Split long prompts over several steps, mixed with decodes.", default=True
    )

    def __post_init__(self) -> None:
        # Checks against max_model_len wait for the model (the Scheduler): it is derived there.
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs."""

    device: str = doc_field("cpu, cuda, or auto (cuda when available).", default="auto")
    num_threads: int | None = doc_field("CPU threads for torch; default: all cores.", default=None)
    compile: bool = doc_field(
        "Compile each decoder layer's code around attention with torch.compile (inductor: "
        "norms, rotary, activations and activation quantization fused into C++ kernels on CPU). "
        "Faster steps where eager code sat between GEMMs (w8a8; BENCHMARKS.md); a warm-up at "
        "start builds the graphs (about 6-15 s, cached on disk for later starts). Needs a C++ "
        "compiler on CPU.",
        default=False,
    )
    cpu_kernels: str = doc_field(
        "CPU kernels: native (C++, built on first use with the system's g++: decode attention "
        "reading K/V in place from the paged pool, the KV write, residual + RMSNorm and "
        "SiLU * up, and at 1-8 rows skinny GEMVs over the packed weights with each decoder "
        "layer's halves fused into one call; float32/bfloat16; attention stays torch with a "
        "quantized KV cache), torch "
        "(torch ops only), or auto: native where it applies and builds, else torch.",
        default="auto",
    )

    batch_invariant: bool = doc_field(
        "Batch-invariant kernels: a request's tokens and logprobs do not depend on what else runs "
        "with it (alone or amid load, its prompt in one chunk or many), for greedy and seeded "
        "requests. Every matmul row is computed the same way whatever the batch and attention "
        "runs per token. CPU only, with the native kernels (float32/bfloat16, unquantized KV "
        "cache), no --compile; costs throughput (BENCHMARKS.md).",
        default=False,
    )

    def __post_init__(self) -> None:
        if self.batch_invariant and self.compile:
            raise ValueError("batch_invariant and compile do not go together (inductor picks "
                             "kernels by shape); choose one")  # fmt: skip
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {DEVICES} or cuda:N, got {self.device!r}")
        if self.cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"cpu_kernels must be one of {CPU_KERNELS}, got {self.cpu_kernels!r}")


EXECUTOR_BACKENDS = ("auto", "uni", "mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """Many ranks as one engine (tensor parallelism)."""

    tensor_parallel_size: int = doc_field(
        "Ranks the model's layers are split over (heads, KV heads, MLP and vocabulary), one "
        "process each, joined by torch.distributed (Gloo on CPU, NCCL on CUDA); two "
        "all-reduces per layer. 1: no torch.distributed at all.",
        default=1,
    )
    pipeline_parallel_size: int = doc_field(
        "Stages the model's layers are split into, one process each (the first holds the "
        "embedding, the last the head and the sampler); a step's batch goes through them in "
        "micro-batches so the stages overlap. With tensor_parallel_size T, each stage is T "
        "ranks: T x P processes in all.",
        default=1,
    )
    distributed_executor_backend: str = doc_field(
        "How ranks run: mp (one process per rank on this machine), ray (one Ray actor per "
        "rank in a placement group, on the cluster this process is connected to, else "
        "RAY_ADDRESS's, else a local one; the 'ray' extra), uni (one process: only "
        "tensor_parallel_size 1), or auto (uni for size 1, else mp).",
        default="auto",
    )

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")  # fmt: skip
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                             f"got {self.distributed_executor_backend!r}")  # fmt: skip
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            raise ValueError(f"distributed_executor_backend uni runs one rank; {self.world_size} "
                             "ranks need mp or ray")  # fmt: skip

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")  # serve/tool_parsers.py FORMATS


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP front: where it listens, who may call it, and its limits."""

    host: str = doc_field("Address to bind (loopback by default).", default="127.0.0.1")
    port: int = doc_field("TCP port.", default=8000)
    served_model_name: str | None = doc_field(
        "The name clients put in 'model'; default: the model folder's or file's name.",
        default=None,
    )
    api_key: tuple[str, ...] = doc_field(
        "Require 'Authorization: Bearer KEY'; KEY or NAME=KEY (NAME is the tenant in usage "
        "accounting); repeat for several keys.",
        default=(),
    )
    admin_key: tuple[str, ...] = doc_field(
        "Keys that may read every tenant's usage at /v1/usage (and call the API as an API key "
        "does); KEY or NAME=KEY; repeat for several. A tenant's key reads only its own usage.",
        default=(),
    )
    metrics_tenants: bool = doc_field(
        "Label /metrics usage series by tenant. Off by default: every tenant is folded into one "
        'series (tenant="all"), so whoever scrapes /metrics learns no tenant names.',
        default=False,
    )
    grace_period: float = doc_field(
        "Seconds in-flight requests get to finish on SIGTERM.", default=30.0
    )
    max_body_bytes: int = doc_field(
        "Largest request body in bytes, counted as read (any transfer encoding); over it: 413.",
        default=4 << 20,
    )
    body_timeout: float = doc_field(
        "Seconds a request body may stall between two reads before the request ends with 408.",
        default=30.0,
    )
    embedding_pooling: str = doc_field(
        "How /v1/embeddings pools the model's final hidden states: last (the last input "
        "token's, as decoder embedding models such as e5-mistral and gte-Qwen are trained) "
        "or mean (over every input token). Vectors are L2-normalized.",
        default="last",
    )
    header_timeout: float = doc_field(
        "Seconds a client may take to send a request's line and headers (from connecting, or "
        "from a kept-alive connection's next request's first byte); slower: 408 and the "
        "connection closed (slowloris clients hold a connection each).",
        default=10.0,
    )
    max_waiting: int | None = doc_field(
        "Most requests waiting for their first token; beyond it new requests are refused "
        "(HTTP 429 with Retry-After).",
        default=None,
    )
    max_request_sequences: int = doc_field(
        "Most sequences one request may start (prompts x n); more is a 400.", default=256
    )
    special_tokens_in_content: bool = doc_field(
        "Let special-token text inside chat messages ('<|im_start|>system') act as control "
        "tokens, for trusted callers that build turns themselves. Off by default: it is "
        "tokenized as plain text, so a user cannot forge a system turn. Completions' raw "
        "prompts are the caller's whole text and always parse special tokens.",
        default=False,
    )
    strict_api: bool = doc_field(
        "Refuse a request with fields this server does not know (400 naming them) instead of "
        "ignoring them with a warning in the log (vLLM's behaviour, the default).",
        default=False,
    )
    chat_template: str | None = doc_field(
        "A Jinja chat template file used in place of the model's own (for every chat "
        "request; e.g. one with a tool section).",
        default=None,
    )
    tool_call_parser: str | None = doc_field(
        "How to read tool calls in the model's output for tool_choice auto: hermes "
        "(<tool_call> JSON blocks; the bundled model with tokenmill's tool template), "
        "llama3_json or mistral.",
        default=None,
    )
    enable_auto_tool_choice: bool = doc_field(
        "Serve tool_choice auto (the default when a request has tools): the model decides "
        "whether to call, the --tool-call-parser reads the calls. Without it such requests are "
        "refused (400); tool_choice required or a named function always work.",
        default=False,
    )
    engine_process: bool = doc_field(
        "Run the engine core in its own process (HTTP, templating, tokenizing and "
        "detokenizing stay in the front process). If the core dies, the server answers every "
        "request in flight with an error and exits with status 1 for the orchestrator to "
        "restart it. --no-engine-process steps the core on a thread of the front process.",
        default=True,
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.grace_period < 0:
            raise ValueError(f"grace_period must be >= 0 seconds, got {self.grace_period}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got "
                f"{self.tool_call_parser!r}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(
                "enable_auto_tool_choice needs tool_call_parser (one of "
                f"{', '.join(TOOL_CALL_PARSERS)}): how to read tool calls in the model's output"
            )
        if self.embedding_pooling not in ("last", "mean"):
            raise ValueError(
                f"embedding_pooling must be last or mean, got {self.embedding_pooling!r}"
            )
        if self.header_timeout <= 0:
            raise ValueError(f"header_timeout must be > 0 seconds, got {self.header_timeout}")
        if self.body_timeout <= 0:
            raise ValueError(f"body_timeout must be > 0 seconds, got {self.body_timeout}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.max_request_sequences < 1:
            raise ValueError(
                f"max_request_sequences must be >= 1, got {self.max_request_sequences}"
            )
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, one sub-config per subsystem."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.parallel.world_size > 1 and (self.quant.rotate or self.quant.quantize_embedding):
            what = "rotate" if self.quant.rotate else "quantize_embedding"
            raise ValueError(
                f"{what} with tensor or pipeline parallelism is not built yet (the rotation "
                "and the quantized head act on the whole model); use it with one rank, or "
                "without it (calibrated methods such as SmoothQuant and GPTQ do shard)"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Route flat keyword arguments (as `LLM(...)` and the CLI take them) to sub-configs.

        An unknown keyword is an error, never silently dropped.
        """
        parts: dict[str, dict[str, Any]] = {p: {} for p in PARTS}
        owners = {f.name: part for part, sub in PARTS.items() for f in fields(sub)}
        for key, value in kwargs.items():
            if key not in owners:
                raise TypeError(f"unknown engine option {key!r}; known: {sorted(owners)}")
            parts[owners[key]][key] = value
        return cls(
            model=ModelConfig(**parts["model"]),
            cache=CacheConfig(**parts["cache"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            device=DeviceConfig(**parts["device"]),
            quant=QuantConfig(**parts["quant"]),
            parallel=ParallelConfig(**parts["parallel"]),
        )


PARTS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "device": DeviceConfig,
    "quant": QuantConfig,
    "parallel": ParallelConfig,
}


def option_help(parts: tuple[type, ...] | None = None) -> dict[str, tuple[str, Any, Any]]:
    """Flat option name -> (help, default, type) for the CLI; the engine's parts by default."""
    out: dict[str, tuple[str, Any, Any]] = {}
    for sub in parts or tuple(PARTS.values()):
        for f in fields(sub):
            out[f.name] = (f.metadata.get("help", ""), f.default, f.type)
    return out
