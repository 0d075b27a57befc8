"""`tco plan`: hardware and precision options compared by cost per million tokens for a demand.

Each option is a measured throughput profile (a `tokenmill bench` JSON) on named hardware. For
a demand in tokens per day: instances = ceil(demand / (throughput x 86400)), each costing its
amortized CapEx and other hourly costs around the clock plus energy. Energy per token comes from
the profile if it recorded joules, else from the catalogue's peak power at that throughput
(labelled modeled). Options whose latency profile misses an SLO are marked, not dropped.
Pure Python: no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tokenmill.cost.tco import JOULES_PER_KWH, Hardware, Prices

THROUGHPUT_KEYS = ("output_throughput", "output_tokens_per_s", "decode_tokens_per_s_median")


@dataclass(frozen=True)
class Profile:
    label: str
    hardware: str
    tokens_per_s: float  # one instance, measured
    joules_per_token: float | None  # measured, if the profile has it
    ttft_p99_ms: float | None
    tpot_p99_ms: float | None


def read_profile(spec: str) -> Profile:
    """'FILE:HARDWARE[:LABEL]' -> Profile (FILE: JSON from tokenmill bench serve|offline|latency)."""
    parts = spec.split(":")
    if len(parts) < 2:
        raise ValueError(f"profile {spec!r}: use FILE:HARDWARE[:LABEL]")
    path, hardware = Path(parts[0]), parts[1]
    data = json.loads(path.read_text())
    tps = next((data[k] for k in THROUGHPUT_KEYS if data.get(k)), None)
    if not tps:
        raise ValueError(f"{path}: no throughput ({', '.join(THROUGHPUT_KEYS)}) in it")
    p99 = lambda k: (data.get(k) or {}).get("p99")  # noqa: E731
    return Profile(
        parts[2] if len(parts) > 2 else path.stem,
        hardware,
        float(tps),
        data.get("joules_per_token"),
        p99("ttft_ms"),
        p99("tpot_ms"),
    )


def plan(
    profiles: list[Profile],
    catalog: dict[str, Hardware],
    prices: Prices,
    tokens_per_day: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> list[dict]:
    """One row per option, cheapest first."""
    if tokens_per_day <= 0:
        raise ValueError("tokens_per_day must be > 0")
    rows = []
    for p in profiles:
        if p.hardware not in catalog:
            raise ValueError(f"hardware {p.hardware!r} is not in the catalogue: {sorted(catalog)}")
        hw = catalog[p.hardware]
        instances = math.ceil(tokens_per_day / (p.tokens_per_s * 86400))
        jpt = p.joules_per_token
        source = "measured"
        if jpt is None:
            jpt, source = hw.peak_watts / p.tokens_per_s, "modeled"
        energy_usd = tokens_per_day * jpt / JOULES_PER_KWH * prices.usd_per_kwh * prices.pue
        fixed_usd = instances * 24 * (hw.capex_usd_per_hour + hw.other_usd_per_hour)
        usd_per_day = fixed_usd + energy_usd
        misses = [
            name
            for name, slo, got in (
                ("ttft", slo_ttft_ms, p.ttft_p99_ms),
                ("tpot", slo_tpot_ms, p.tpot_p99_ms),
            )
            if slo is not None and got is not None and got > slo
        ]
        rows.append(
            {
                "option": p.label,
                "hardware": p.hardware,
                "tokens_per_s_per_instance": p.tokens_per_s,
                "instances": instances,
                "usd_per_day": usd_per_day,
                "usd_per_million_tokens": usd_per_day / tokens_per_day * 1e6,
                "joules_per_token": jpt,
                "energy_source": source,
                "meets_slo": not misses,
                "misses": misses,
            }
        )
    return sorted(rows, key=lambda r: r["usd_per_million_tokens"])
