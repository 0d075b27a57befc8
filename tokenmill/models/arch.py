"""ModelArch: the hyper-parameters a model class needs, read from HF config.json or GGUF metadata.

Both loaders produce this one frozen record, so the model code never sees where weights came from.
Handles both config dialects of `transformers`: 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SSMArch:
    """A Mamba-2 mixer's hyper-parameters (HF Mamba2Config's names in comments)."""

    num_heads: int  # num_heads
    head_dim: int  # head_dim
    state_size: int  # state_size
    num_groups: int  # n_groups
    conv_kernel: int  # conv_kernel
    chunk_size: int  # chunk_size
    use_bias: bool = False  # use_bias: in_proj and out_proj
    use_conv_bias: bool = True  # use_conv_bias
    residual_in_fp32: bool = True
    time_step_limit: tuple[float, float] = (0.0, float("inf"))


@dataclass(frozen=True)
class ModelArch:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    torch_dtype: str = "float32"  # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ssm: SSMArch | None = None  # state-space layers (Mamba-2), None for a transformer
    layer_types: tuple[str, ...] = ()  # a hybrid's "attention" / "mamba" per layer
    partial_rotary_factor: float = 1.0  # share of each head's dims that RoPE turns

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        if self.ssm is not None:
            s = self.ssm
            conv = i + 2 * s.num_groups * s.state_size
            layer = h * (i + conv + s.num_heads) + conv * s.conv_kernel + 3 * s.num_heads + i + i * h + h  # fmt: skip
            return self.num_layers * layer + self.vocab_size * h + h + head
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + h + head


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _number(value: Any) -> float:
    """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def mamba2_arch(cfg: dict[str, Any]) -> ModelArch:
    """A Mamba2Config: the SSM record; the attention fields are unused (no attention layers)."""
    heads, head_dim = cfg["num_heads"], cfg["head_dim"]
    limit = [_number(x) for x in cfg.get("time_step_limit") or (0.0, float("inf"))]
    ssm = SSMArch(
        num_heads=heads, head_dim=head_dim, state_size=cfg["state_size"],
        num_groups=cfg.get("n_groups", 1), conv_kernel=cfg.get("conv_kernel", 4),
        chunk_size=cfg.get("chunk_size", 256), use_bias=bool(cfg.get("use_bias", False)),
        use_conv_bias=bool(cfg.get("use_conv_bias", True)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        time_step_limit=(float(limit[0]), float(limit[1])),
    )  # fmt: skip
    return ModelArch(
        architecture="Mamba2ForCausalLM",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=heads * head_dim,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        max_position_embeddings=cfg.get("max_position_embeddings") or SSM_NO_LIMIT,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        ssm=ssm,
    )


def bamba_arch(cfg: dict[str, Any]) -> ModelArch:
    """A BambaConfig: attention layers at `attn_layer_indices`, Mamba-2 mixers elsewhere, each
    followed by an MLP; RoPE on half of each head."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    ssm_heads = cfg["mamba_n_heads"]
    d_head = cfg.get("mamba_d_head")
    if d_head in (None, "auto"):
        d_head = cfg.get("mamba_expand", 2) * hidden // ssm_heads
    limit = [_number(x) for x in cfg.get("time_step_limit") or (0.0, float("inf"))]
    ssm = SSMArch(
        num_heads=ssm_heads, head_dim=d_head, state_size=cfg["mamba_d_state"],
        num_groups=cfg.get("mamba_n_groups", 1), conv_kernel=cfg.get("mamba_d_conv", 4),
        chunk_size=cfg.get("mamba_chunk_size", 256), use_bias=bool(cfg.get("mamba_proj_bias", False)),
        use_conv_bias=bool(cfg.get("mamba_conv_bias", True)), residual_in_fp32=False,
        time_step_limit=(float(limit[0]), float(limit[1])),
    )  # fmt: skip
    attn = set(cfg.get("attn_layer_indices") or ())
    theta, scaling = _rope(cfg)
    rope = cfg.get("rope_parameters") or {}
    return ModelArch(
        architecture="BambaForCausalLM",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=None if scaling is None else {k: v for k, v in scaling.items() if k != "partial_rotary_factor"} or None,
        max_position_embeddings=cfg.get("max_position_embeddings", 262144),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=bool(cfg.get("attention_bias", False)),
        o_proj_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        ssm=ssm,
        layer_types=tuple("attention" if i in attn else "mamba" for i in range(cfg["num_hidden_layers"])),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))),
    )  # fmt: skip


SSM_NO_LIMIT = 1 << 24  # a state-space model has no position limit
SSM_MAX_LEN = 16384  # its default max_model_len (the scheduler's bookkeeping grows with it)


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    """Read a config.json dict. `architectures[0]` decides the family-specific flags."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError("config.json has no 'architectures' entry; cannot tell the model class")
    architecture = archs[0]
    if architecture == "Mamba2ForCausalLM":
        return mamba2_arch(cfg)
    if architecture == "BambaForCausalLM":
        return bamba_arch(cfg)
    heads = cfg["num_attention_heads"]
    theta, scaling = _rope(cfg)
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:
        window = None
    return ModelArch(
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
        o_proj_bias=bool(cfg.get("attention_bias", False)) and not is_qwen2,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=window,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    )
