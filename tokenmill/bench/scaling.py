"""The interconnect model: where a model stops scaling on a given link, before buying it.

Pure arithmetic over a model's shape, a device's peaks and a link's bandwidth and latency
(`scaling.toml`, extendable). For one engine step (a prefill of `batch` prompts of `context`
tokens, or a decode step of `batch` sequences holding `context` tokens each), on `tp` x `pp`
chips:

- compute, per chip: the step's FLOPs (2 per weight per token, plus attention's 4 x context x
  heads x head_dim per token and layer; causal prefill attends to half the context on average)
  and bytes (its weights, once per micro-batch, plus the KV it reads) against the device's
  roofline: time = max(FLOPs / (flops x efficiency), bytes / (bandwidth x efficiency)). Heads,
  KV heads (replicated when fewer than tp), the MLP and the vocabulary split tp ways; layers
  split pp ways.
- tensor parallelism: two all-reduces per layer (after attention, after the MLP) of the
  micro-batch's activations (tokens x hidden x 2 bytes). Within a link's domain the faster of
  ring (2 (p-1)/p x bytes / bandwidth + 2 (p-1) x latency) and tree (2 log2 p x latency +
  2 x bytes / bandwidth: what NCCL picks for small messages); past it hierarchical, as NCCL
  does across nodes: reduce-scatter and all-gather inside each domain, an all-reduce of the
  1/domain shard between domains on the `between` link. Not overlapped with compute.
- pipeline parallelism: `microbatches` m (default: pp, or the batch when smaller) through pp
  stages; each boundary sends the micro-batch's activations once (bandwidth + latency), at the
  node link's pace once tp x pp exceeds the domain. Schedule "interleaved" (a serving engine:
  micro-batches of different requests in flight across steps, as vLLM's virtual engines):
  step = max(m, pp) x (stage + send), bubbles where m < pp; "sync" (each step drains the
  pipeline, GPipe): (m + pp - 1) x (stage + send). Each micro-batch reads its stage's weights
  again: PP buys a memory-bound decode little.

Reported per layout: step time, the share of it waiting on communication (all-reduces, sends
and bubbles), tokens/s, and the scaling efficiency T(1) / (n x T(n)), where T(1) is the same
step on one chip (hypothetical when the weights do not fit one: `fits` says so).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

CATALOG = Path(__file__).with_name("scaling.toml")
ACT_BYTES = 2  # activations and KV in 16 bits


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    weight_bytes: float = 2.0  # bytes per weight (2: bf16; 1: fp8/int8; 0.5625: 4-bit + scales)

    @property
    def layer_weights(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def weights(self) -> int:
        """Every weight: layers, embedding, and the LM head unless tied."""
        embed = self.vocab * self.hidden
        return self.layers * self.layer_weights + embed * (1 if self.tied else 2)


@dataclass(frozen=True)
class Device:
    name: str
    flops: float
    bandwidth: float
    memory: float
    compute_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    description: str = ""


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per chip per direction
    latency: float  # seconds per message
    domain: int = 1 << 30  # chips it joins directly
    between: str | None = None  # the link past the domain
    description: str = ""


@dataclass(frozen=True)
class Step:
    tp: int
    pp: int
    microbatches: int
    tokens: int
    compute_s: float  # on the critical path: m + pp - 1 stage computations
    allreduce_s: float
    send_s: float
    bubble_s: float
    step_s: float
    fits: bool  # weights and KV fit the chips' memory
    memory_per_chip: float

    @property
    def chips(self) -> int:
        return self.tp * self.pp

    @property
    def comm_share(self) -> float:
        """Of the step, the time not computing: all-reduces, sends, bubbles."""
        return (self.allreduce_s + self.send_s + self.bubble_s) / self.step_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


def load_catalog(user: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """{"devices": {name: Device}, "links": {name: Link}, "models": {name: Shape}}."""
    data = tomllib.loads(CATALOG.read_text())
    if user is not None:
        for kind, entries in tomllib.loads(Path(user).read_text()).items():
            if kind not in ("devices", "links", "models"):
                raise ValueError(f"{user}: unknown table [{kind}]; devices, links or models")
            for name, fields in entries.items():
                data.setdefault(kind, {}).setdefault(name, {}).update(fields)
    try:
        return {
            "devices": {n: Device(n, **f) for n, f in data["devices"].items()},
            "links": {n: Link(n, **f) for n, f in data["links"].items()},
            "models": {n: Shape(n, **f) for n, f in data["models"].items()},
        }
    except TypeError as e:
        raise ValueError(f"scaling catalogue: {e}") from None


def shape_of(model: str, catalog: dict[str, dict[str, Any]]) -> Shape:
    """A catalogue shape by name, or an HF folder's config.json."""
    if model in catalog["models"]:
        return catalog["models"][model]
    path = Path(model) / "config.json"
    if not path.is_file():
        raise ValueError(f"model {model!r}: not in the catalogue ({', '.join(catalog['models'])}) and no {path}")  # fmt: skip
    c = json.loads(path.read_text())
    heads = c["num_attention_heads"]
    return Shape(
        Path(model).name, c["hidden_size"], c["num_hidden_layers"], heads,
        c.get("num_key_value_heads", heads), c.get("head_dim") or c["hidden_size"] // heads,
        c["intermediate_size"], c["vocab_size"], bool(c.get("tie_word_embeddings", False)),
    )  # fmt: skip


def ring_allreduce_s(nbytes: float, ranks: int, link: Link) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth + 2 * (ranks - 1) * link.latency


def tree_allreduce_s(nbytes: float, ranks: int, link: Link) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * math.log2(ranks) * link.latency + 2 * nbytes / link.bandwidth


def allreduce_s(nbytes: float, ranks: int, link: Link, links: dict[str, Link]) -> float:
    """An all-reduce of `nbytes` over `ranks` chips joined by `link` (and what lies past its
    domain)."""
    if ranks <= link.domain:
        return min(ring_allreduce_s(nbytes, ranks, link), tree_allreduce_s(nbytes, ranks, link))
    if link.between is None:
        raise ValueError(f"{ranks} chips exceed link {link.name}'s domain of {link.domain} and it names no link past it")  # fmt: skip
    inside = link.domain
    shard_s = (inside - 1) / inside * nbytes / link.bandwidth + (inside - 1) * link.latency
    across = math.ceil(ranks / inside)
    return 2 * shard_s + allreduce_s(nbytes / inside, across, links[link.between], links)


def link_for(chips: int, link: Link, links: dict[str, Link]) -> Link:
    """The link a group of `chips` talks over: `link` within its domain, else the next up."""
    while chips > link.domain:
        if link.between is None:
            raise ValueError(f"{chips} chips exceed link {link.name}'s domain of {link.domain} and it names no link past it")  # fmt: skip
        link = links[link.between]
    return link


def step(
    shape: Shape,
    device: Device,
    link: Link,
    links: dict[str, Link],
    tp: int = 1,
    pp: int = 1,
    mode: str = "decode",
    batch: int = 1,
    context: int = 2048,
    microbatches: int | None = None,
    schedule: str = "interleaved",
) -> Step:
    if mode not in ("decode", "prefill"):
        raise ValueError(f"mode must be decode or prefill, got {mode!r}")
    if schedule not in ("interleaved", "sync"):
        raise ValueError(f"schedule must be interleaved or sync, got {schedule!r}")
    if tp < 1 or pp < 1 or pp > shape.layers:
        raise ValueError(f"tp {tp} and pp {pp} must be >= 1, pp at most the {shape.layers} layers")  # fmt: skip
    m = microbatches or min(pp, batch)
    tokens = batch * context if mode == "prefill" else batch
    q = shape.heads * shape.head_dim
    attended = context / 2 if mode == "prefill" else context
    # the whole step's work, then one chip's share of one micro-batch
    flops = 2 * shape.weights * tokens + 4 * attended * q * shape.layers * tokens
    kv_heads_per_chip = max(shape.kv_heads / tp, 1.0)  # replicated when fewer than tp
    kv_entry = 2 * shape.head_dim * ACT_BYTES * shape.layers / pp  # K and V, one token, one head
    kv_read = batch * context * kv_heads_per_chip * kv_entry if mode == "decode" else 0.0
    weights_chip = shape.weights * shape.weight_bytes / (tp * pp)
    flops_mb = flops / (tp * pp) / m
    bytes_mb = weights_chip + kv_read / m  # the weights are read again for every micro-batch
    stage_s = max(flops_mb / (device.flops * device.compute_efficiency),
                  bytes_mb / (device.bandwidth * device.bandwidth_efficiency))  # fmt: skip
    act_mb = tokens / m * shape.hidden * ACT_BYTES
    allreduce_mb = 2 * (shape.layers / pp) * allreduce_s(act_mb, tp, link, links)
    pp_link = link_for(tp * pp, link, links) if pp > 1 else link
    send_mb = act_mb / pp_link.bandwidth + pp_link.latency if pp > 1 else 0.0
    per_mb = stage_s + allreduce_mb + send_mb
    slots = m + pp - 1 if schedule == "sync" else max(m, pp)
    kv_capacity = batch * context * kv_heads_per_chip * kv_entry  # what the chip holds
    memory = weights_chip + kv_capacity
    return Step(
        tp, pp, m, tokens,
        compute_s=m * stage_s, allreduce_s=m * allreduce_mb, send_s=m * send_mb,
        bubble_s=(slots - m) * per_mb, step_s=slots * per_mb,
        fits=memory <= device.memory, memory_per_chip=memory,
    )  # fmt: skip


def efficiency(one: Step, many: Step) -> float:
    """T(1) / (n x T(n)): 1 is linear scaling; tokens/s gained per chip added."""
    return one.step_s / (many.chips * many.step_s)


def sweep(
    shape: Shape,
    device: Device,
    link: Link,
    links: dict[str, Link],
    chips: list[int],
    **scenario: Any,
) -> list[dict[str, Any]]:
    """TP and PP at each chip count: rows ready for a table, JSON or a plot."""
    one = step(shape, device, link, links, 1, 1, **scenario)
    rows = []
    for n in chips:
        for kind in ("tp", "pp"):
            if kind == "pp" and n > shape.layers:
                continue
            s = step(shape, device, link, links, n if kind == "tp" else 1, n if kind == "pp" else 1, **scenario)  # fmt: skip
            rows.append({
                "parallelism": kind, "chips": n, "step_ms": s.step_s * 1e3,
                "comm_share": s.comm_share, "tokens_per_s": s.tokens_per_s,
                "efficiency": efficiency(one, s), "fits": s.fits,
                "memory_per_chip_gb": s.memory_per_chip / 1e9,
                "link": link_for(n, link, links).name,
            })  # fmt: skip
    return rows


def with_bytes(shape: Shape, weight_bytes: float) -> Shape:
    return replace(shape, weight_bytes=weight_bytes)
