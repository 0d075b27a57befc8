"""Serving benchmark metrics from per-request timestamps, as `vllm bench serve` reports them.

Pure Python: a request is its send time, the arrival time of each streamed chunk that carried
tokens, and token counts. TTFT = first chunk - send; TPOT = (last - first) / (tokens - 1);
ITL = gaps between successive chunks; E2E = last - send. Goodput counts requests meeting every
SLO given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    sent: float  # seconds (monotonic)
    chunk_times: list[float] = field(default_factory=list)  # arrivals of token-carrying chunks
    prompt_tokens: int = 0
    output_tokens: int = 0
    ok: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.chunk_times[-1] - self.sent if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or len(self.chunk_times) < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, median, p90, p99 (milliseconds by default)."""
    if not values:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "p99": math.nan}
    return {
        "mean": scale * sum(values) / len(values),
        "median": scale * percentile(values, 50),
        "p90": scale * percentile(values, 90),
        "p99": scale * percentile(values, 99),
    }


def report(
    records: list[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict:
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)

    def meets(r: RequestRecord) -> bool:
        if slo_ttft_ms is not None and (r.ttft is None or r.ttft * 1000 > slo_ttft_ms):
            return False
        tpot = r.tpot
        return slo_tpot_ms is None or tpot is None or tpot * 1000 <= slo_tpot_ms

    good = [r for r in done if meets(r)]
    return {
        "duration_s": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "request_throughput": len(done) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "goodput": len(good) / duration_s if (slo_ttft_ms or slo_tpot_ms) else None,
        "ttft_ms": summarize([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": summarize([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": summarize([g for r in done for g in r.itls]),
        "e2e_ms": summarize([r.e2e for r in done if r.e2e is not None]),
    }
