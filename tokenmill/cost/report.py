"""Usage -> cost: TCO per model, instance and tenant, derived when asked, never stored.

For each (model, instance): hours of uptime x its share of the device (1 unless it runs on a
slice: a MIG instance, a GPU memory share, some of the cores) x the hardware's CapEx per hour
(amortized) and other hourly costs, split over tenants by their share of the tokens; energy cost from each
tenant's own joules x price x PUE. Every figure carries the energy source ("modeled" or
"measured: ...") of the meter that produced it. Pure Python: no torch.
"""

from __future__ import annotations

from collections import defaultdict

from tokenmill.cost.accounting import Key, Uptime, Usage
from tokenmill.cost.tco import Hardware, Prices, cost


def usage_report(
    usage: dict[Key, Usage],
    uptime: dict[tuple[str, str], Uptime],
    catalog: dict[str, Hardware],
    prices: Prices,
) -> dict:
    """JSON-ready report: one entry per (model, instance, tenant) and per (model, instance)."""
    by_instance: dict[tuple[str, str], list[tuple[str, Usage]]] = defaultdict(list)
    for (model, instance, tenant), u in usage.items():
        by_instance[(model, instance)].append((tenant, u))
    tenants, instances = [], []
    grand = {"usd": 0.0, "tokens": 0, "joules": 0.0}
    for (model, instance), rows in sorted(by_instance.items()):
        seconds, hw_name, source, device_seconds = uptime.get((model, instance), (0.0, "", "unknown", 0.0))  # fmt: skip
        hw = catalog.get(hw_name)
        hours, device_hours = seconds / 3600, device_seconds / 3600
        tokens = sum(u.tokens for _, u in rows)
        total = Usage()
        for _, u in rows:
            total.add(u)
        inst_usd = 0.0
        for tenant, u in sorted(rows):
            share = u.tokens / tokens if tokens else (1.0 if len(rows) == 1 else 0.0)
            c = cost(hw, prices, device_hours * share, u.joules, u.tokens) if hw else None
            usd = c.total_usd if c else None
            inst_usd += usd or 0.0
            tenants.append(
                {
                    "model": model,
                    "instance": instance,
                    "tenant": tenant,
                    **_usage_fields(u),
                    "cost_usd": usd,
                    "cost_per_million_tokens": c.usd_per_million_tokens if c and u.tokens else None,
                    "energy_source": source,
                }
            )
        instances.append(
            {
                "model": model,
                "instance": instance,
                "hardware": hw_name,
                "uptime_hours": hours,
                "device_share": device_seconds / seconds if seconds else None,
                **_usage_fields(total),
                "tokens_per_joule": tokens / total.joules if total.joules else None,
                "cost_usd": inst_usd if hw else None,
                "cost_per_million_tokens": inst_usd / tokens * 1e6 if hw and tokens else None,
                "energy_source": source,
            }
        )
        grand["usd"] += inst_usd
        grand["tokens"] += tokens
        grand["joules"] += total.joules
    return {
        "prices": {"usd_per_kwh": prices.usd_per_kwh, "pue": prices.pue},
        "instances": instances,
        "tenants": tenants,
        "total": {
            "tokens": grand["tokens"],
            "energy_joules": grand["joules"],
            "cost_usd": grand["usd"],
            "cost_per_million_tokens": grand["usd"] / grand["tokens"] * 1e6
            if grand["tokens"]
            else None,
        },
    }


def _usage_fields(u: Usage) -> dict:
    return {
        "requests": u.requests,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "energy_joules": u.joules,
        "joules_per_token": u.joules / u.tokens if u.tokens else None,
    }
