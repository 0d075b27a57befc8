"""Usage and cost while serving: tokens per tenant from engine outputs, energy from the meter
thread, both into one Accountant (cost/accounting.py); exported at /metrics and /v1/usage.

The tenant of a request is the name of the API key it came with, else its `user` field, else
"anonymous". Cost figures are derived on each read from the TCO catalogue (cost/report.py).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tokenmill.cost.accounting import Accountant, UsageStore
from tokenmill.cost.energy import ShareMeter, choose_meter
from tokenmill.cost.report import usage_report
from tokenmill.cost.sampler import PowerSampler
from tokenmill.cost.tco import load_catalog
from tokenmill.engine.outputs import RequestOutput

log = logging.getLogger(__name__)
DEFAULT_DB = Path.home() / ".cache" / "tokenmill" / "usage.sqlite"
ANONYMOUS = "anonymous"
OTHER = "other"  # where tenants past the bounds are counted
MAX_TENANT_LEN = 64  # characters of a tenant name (a user id or a hash fits)
MAX_TENANTS = 1000  # distinct tenants per server process


@dataclass(frozen=True)
class UsageOptions:
    """How serving is metered and priced (the `tokenmill serve` cost flags)."""

    db_path: Path = DEFAULT_DB  # SQLite file that keeps accounting across restarts
    hardware: str = "auto"  # catalogue entry; auto: by CUDA device name, else cpu-2core
    catalog: Path | None = None  # user TOML overriding the shipped catalogue
    interval_s: float = 1.0  # power sampling period
    instance: str | None = None  # default: the host name (stable over restarts)


def pick_hardware(device_type: str, device_name: str, names: list[str]) -> str:
    if device_type == "cuda":
        lowered = device_name.lower()
        for key in ("h200", "h100", "b200", "l40s"):
            if key in lowered:
                return next(n for n in names if n.startswith(key))
    return "cpu-2core"


class UsageTracker:
    """Attach to an AsyncEngine: counts tokens per tenant and runs the power sampler."""

    def __init__(
        self,
        opts: UsageOptions,
        model: str,
        instance: str | None,
        store: UsageStore | None = None,
        share: float = 1.0,
    ) -> None:
        """`store`: one shared by a fleet's instances (else its own); `share`: the part of
        the device this instance holds (its slice), which scales its hardware cost and, where
        the meter reads the whole device, its energy."""
        self.opts, self.share = opts, share
        self.catalog, self.prices = load_catalog(opts.catalog)
        self.model, self.instance = model, instance or socket.gethostname()
        self._owns_store = store is None
        self.store = store if store is not None else UsageStore(opts.db_path)
        self.accountant: Accountant | None = None
        self.sampler: PowerSampler | None = None
        self.seen: dict[str, int] = {}  # request id -> tokens already counted
        self.tenant_labels = False  # /metrics by tenant (--metrics-tenants), else folded to "all"
        self.tenant_names: set[str] = set()  # distinct tenants seen (bounded)

    def start(self, engine) -> None:
        """The model is loaded: choose hardware and meter, start sampling."""
        device_type, name = engine.info.device_type, engine.info.device_name
        hw_name = self.opts.hardware
        if hw_name == "auto":
            hw_name = pick_hardware(device_type, name, list(self.catalog))
        if hw_name not in self.catalog:
            raise ValueError(
                f"hardware {hw_name!r} is not in the catalogue: {sorted(self.catalog)}"
            )
        hw = self.catalog[hw_name]
        self.engine = engine
        meter = choose_meter(device_type, hw.idle_watts, hw.peak_watts, _utilization(self))
        if self.share != 1.0:
            meter = ShareMeter(meter, self.share)
        log.info("energy: %s (%s); usage kept in %s", meter.label, hw_name, self.opts.db_path)
        self.accountant = Accountant(self.model, self.instance, hw_name, meter.label, self.store,
                                     share=self.share)  # fmt: skip
        self.sampler = PowerSampler(meter, self.accountant, self.opts.interval_s)
        self.sampler.start()

    def rebind(self, engine) -> None:
        """The instance's engine was restarted: count the new one's outputs and busy time, into
        the same totals."""
        if self.accountant is None:
            self.start(engine)
        else:
            self.engine = engine

    def observe(self, out: RequestOutput) -> None:
        """Every engine output (engine thread): the tokens it adds, charged to its tenant."""
        if self.accountant is None:
            return
        tenant = self.bounded(self.engine.tenants.get(out.request_id, ANONYMOUS))
        done = sum(len(c.token_ids) for c in out.outputs)
        before = self.seen.get(out.request_id)
        prompt = len(out.prompt_token_ids) if before is None else 0
        self.accountant.record_tokens(tenant, prompt, done - (before or 0), int(out.finished))
        if out.finished:
            self.seen.pop(out.request_id, None)
        else:
            self.seen[out.request_id] = done

    def bounded(self, tenant: str) -> str:
        """Tenant names are client input (`user`): at most MAX_TENANT_LEN characters and
        MAX_TENANTS distinct names; the rest are folded into "other", so neither /metrics nor
        the usage store grows without bound."""
        if tenant in self.tenant_names:
            return tenant
        if len(tenant) > MAX_TENANT_LEN or len(self.tenant_names) >= MAX_TENANTS:
            return OTHER
        self.tenant_names.add(tenant)
        return tenant

    def report(self) -> dict:
        if self.accountant is None:
            return usage_report({}, {}, self.catalog, self.prices)
        usage = self.accountant.snapshot()
        uptime = self.store.uptime()
        return usage_report(usage, uptime, self.catalog, self.prices)

    def collect(self):
        """Prometheus collector: read on every scrape, so cost follows the catalogue."""
        report = self.report()
        labels = ["model", "instance", "tenant", "energy_source"]
        energy = CounterMetricFamily(
            "tokenmill:energy_joules", "Energy drawn, split by tenant", labels=labels
        )
        tokens = CounterMetricFamily(
            "tokenmill:usage_tokens", "Tokens served", labels=[*labels, "kind"]
        )
        cost = GaugeMetricFamily("tokenmill:cost_usd", "TCO so far (derived)", labels=labels)
        for key, t in self._tenant_rows(report["tenants"]).items():
            energy.add_metric(list(key), t["energy_joules"])
            tokens.add_metric([*key, "prompt"], t["prompt_tokens"])
            tokens.add_metric([*key, "completion"], t["completion_tokens"])
            if t["cost_usd"] is not None:
                cost.add_metric(list(key), t["cost_usd"])
        per_j = GaugeMetricFamily(
            "tokenmill:tokens_per_joule", "Tokens per joule", labels=labels[:2] + labels[3:]
        )
        per_m = GaugeMetricFamily(
            "tokenmill:cost_per_million_tokens",
            "USD per million tokens (TCO)",
            labels=labels[:2] + labels[3:],
        )
        watts = GaugeMetricFamily(
            "tokenmill:power_watts",
            "Mean power over the last sampling interval",
            labels=labels[:2] + labels[3:],
        )
        for i in report["instances"]:
            key = [i["model"], i["instance"], i["energy_source"]]
            if i["tokens_per_joule"] is not None:
                per_j.add_metric(key, i["tokens_per_joule"])
            if i["cost_per_million_tokens"] is not None:
                per_m.add_metric(key, i["cost_per_million_tokens"])
        if self.accountant is not None:
            key = [self.model, self.instance, self.accountant.energy_source]
            watts.add_metric(key, self.accountant.last_watts)
        return [energy, tokens, cost, per_j, per_m, watts]

    def _tenant_rows(self, rows: list[dict]) -> dict[tuple, dict]:
        """(model, instance, tenant, source) -> sums; tenants folded into "all" unless labelled."""
        out: dict[tuple, dict] = {}
        for t in rows:
            tenant = t["tenant"] if self.tenant_labels else "all"
            key = (t["model"], t["instance"], tenant, t["energy_source"])
            acc = out.setdefault(key, {"energy_joules": 0.0, "prompt_tokens": 0,
                                       "completion_tokens": 0, "cost_usd": None})  # fmt: skip
            acc["energy_joules"] += t["energy_joules"]
            acc["prompt_tokens"] += t["prompt_tokens"]
            acc["completion_tokens"] += t["completion_tokens"]
            if t["cost_usd"] is not None:
                acc["cost_usd"] = (acc["cost_usd"] or 0.0) + t["cost_usd"]
        return out

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self._owns_store:
            self.store.close()


def _utilization(tracker: UsageTracker):
    """Busy fraction of the tracker's engine since the previous call (the modeled meter's
    input); a restarted engine counts from 0 again (that interval reads as idle)."""
    last = {"busy": tracker.engine.busy_s, "t": time.monotonic()}

    def read() -> float:
        busy, now = tracker.engine.busy_s, time.monotonic()
        dt = now - last["t"]
        u = (busy - last["busy"]) / dt if dt > 0 else 0.0
        last.update(busy=busy, t=now)
        return u

    return read
