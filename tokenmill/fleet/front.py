"""The fleet behind one endpoint: `tokenmill serve --config FLEET.toml`.

Every replica of FLEET.toml is an engine core in its own bound process (fleet/instances.py);
this module puts them behind the one HTTP front (serve/app.py):
- `ServedModel`: one served model's replicas behind the part of AsyncEngine the handlers use
  (`add`, `tokenizer`, `info`, `max_model_len`): each request is tokenized once here, routed by
  the router on its token ids (least outstanding tokens, prefix affinity) and added to the
  chosen replica's engine; its outputs release it in the router.
- `Fleet`: the instances started, watched by the supervisor (a dead or hung core is restarted
  with backoff, its model answers 503 + Retry-After meanwhile), with each replica's serving
  metrics and usage labelled by instance (`instance="chat#1"`), merged into one registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.engine.async_engine import AsyncEngine, RequestStream
from tokenmill.engine.input_processor import InputProcessor, PromptType
from tokenmill.fleet import instances as fleet_instances
from tokenmill.fleet.instances import Instance
from tokenmill.fleet.router import Router, Unavailable
from tokenmill.fleet.supervisor import Supervisor, restart
from tokenmill.sampling_params import SamplingParams
from tokenmill.serve.metrics import ServingMetrics
from tokenmill.serve.usage import UsageOptions, UsageTracker

log = logging.getLogger(__name__)


class ServedModel:
    """One served model: its replicas, chosen per request by the router."""

    def __init__(self, name: str, replicas: list[Instance], router: Router) -> None:
        self.name, self.router = name, router
        self.replicas = {i.name: i for i in replicas}
        first = _engine(replicas[0])
        self.tokenizer = first.tokenizer
        self.info = first.info  # one model, one configuration: every replica's is the same
        self.max_model_len = min(_engine(i).max_model_len for i in replicas)
        self.inputs = InputProcessor(self.tokenizer, self.info.vocab_size, self.max_model_len)

    @property
    def is_dead(self) -> bool:
        return not any(self.router.is_up(n) for n in self.replicas)

    @property
    def num_in_flight(self) -> int:
        return sum(i.engine.num_in_flight for i in self.replicas.values() if i.engine is not None)  # type: ignore[attr-defined]  # fmt: skip

    async def add(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        tenant: str | None = None,
    ) -> RequestStream:
        """Tokenize (once, for routing and the engine), pick a replica, queue it there.
        Unavailable when no replica of the model is up (503 + Retry-After)."""
        text, ids = await asyncio.to_thread(self.inputs.tokenize, prompt)
        while True:  # Unavailable once no replica is up
            replica = self.router.pick(self.name, ids)
            engine = self.replicas[replica].engine
            if engine is not None and not engine.is_dead:  # type: ignore[attr-defined]
                break
            # died a moment ago (its engine marks it down as it dies): not this one
            self.router.mark_down(replica)
        self.router.started(request_id, replica, len(ids) + (params.max_tokens or 0) * params.n)
        try:
            return await engine.add(  # type: ignore[attr-defined]
                request_id, {"prompt": text, "prompt_token_ids": ids}, params, tenant
            )
        except BaseException:
            self.router.finished(request_id)
            raise


def _engine(inst: Instance) -> AsyncEngine:
    assert inst.engine is not None, f"instance {inst.name} is not started"
    return inst.engine  # type: ignore[return-value]


class Fleet:
    """The started instances of one FLEET.toml, routed, supervised, metered."""

    def __init__(
        self,
        instances: list[Instance],
        usage: UsageOptions | None = None,
        tenant_labels: bool = False,
        hang_after: float = 120.0,
    ) -> None:
        self.instances = instances
        by_model: dict[str, list[Instance]] = {}
        for inst in instances:
            by_model.setdefault(inst.model_name, []).append(inst)
        self._by_model = by_model
        self.router = Router({m: [i.name for i in group] for m, group in by_model.items()})
        self.metrics = {
            i.name: ServingMetrics(lambda i=i: i.engine, i.model_name)  # type: ignore[misc]
            for i in instances
        }
        self.usage: dict[str, UsageTracker] = {}
        self._store = None
        if usage is not None:
            from tokenmill.cost.accounting import UsageStore

            self._store = UsageStore(usage.db_path)
            for i in instances:
                tracker = UsageTracker(usage, i.model_name, i.name, self._store, i.share)
                tracker.tenant_labels = tenant_labels
                self.usage[i.name] = tracker
        self.supervisor = Supervisor(instances, self.router, self._restart, hang_after=hang_after)
        self.models: dict[str, ServedModel] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_FleetCollector(self))

    def start(self) -> None:
        """Start every instance (a failure stops those started and raises), then serve."""
        fleet_instances.start(self.instances)
        for inst in self.instances:
            self._attach(inst)
        self.models = {m: ServedModel(m, group, self.router) for m, group in self._by_model.items()}  # fmt: skip
        self.supervisor.run()
        for inst in self.instances:
            log.info("instance %s serves %r (%s)", inst.name, inst.model_name, inst.describe())

    def _restart(self, inst: Instance) -> None:
        restart(inst)
        self._attach(inst)

    def _attach(self, inst: Instance) -> None:
        """Hooks of a (re)started instance's engine: its metrics, its usage, the router."""
        engine = _engine(inst)
        metrics, tracker, router = self.metrics[inst.name], self.usage.get(inst.name), self.router

        def observe(out) -> None:
            metrics.observe(out)
            if tracker is not None:
                tracker.observe(out)
            if out.finished:
                router.finished(out.request_id)

        engine.on_output = observe
        engine.on_step = metrics.observe_step
        # down in the router the moment the core is lost, not at the supervisor's next look
        engine.on_dead = lambda reason: router.mark_down(inst.name)
        if tracker is not None:
            tracker.rebind(engine)

    def stop(self) -> None:
        self.supervisor.stop()
        fleet_instances.stop(self.instances)
        for tracker in self.usage.values():
            tracker.close()
        if self._store is not None:
            self._store.close()

    def model(self, name: str) -> ServedModel:
        """KeyError for a model not served here."""
        return self.models[name]

    @property
    def ready(self) -> bool:
        """Started, and some model has a replica up (one down model does not take the others'
        readiness: it answers 503 on its own)."""
        return bool(self.models) and any(not m.is_dead for m in self.models.values())

    @property
    def num_in_flight(self) -> int:
        return sum(m.num_in_flight for m in self.models.values())

    def health(self) -> list[dict[str, Any]]:
        """Per instance: its model, whether it is up, restarts, where it runs."""
        from tokenmill.partition.cgroups import memory_of

        load = self.router.load()
        out = []
        for inst in self.instances:
            engine = inst.engine
            group = memory_of(inst.name)  # None: no cgroup (RLIMIT_DATA holds the cap)
            process = getattr(getattr(engine, "client", None), "process", None)
            out.append({
                "instance": inst.name,
                "model": inst.model_name,
                "status": "up" if self.router.is_up(inst.name) else "down",
                "restarts": self.supervisor.restarts_of(inst.name),
                "slice": inst.describe(),
                "cores": list(inst.binding.cores),
                "device_share": inst.share,
                "pid": getattr(process, "pid", None),
                "host": getattr(process, "host", None),  # a Ray actor's node (None: here)
                "memory_cap_bytes": inst.binding.memory_limit,
                "memory_used_bytes": group[0] if group else None,
                "outstanding_tokens": load[inst.name],
                "requests_in_flight": engine.num_in_flight if engine is not None else 0,  # type: ignore[attr-defined]
            })  # fmt: skip
        return out

    def usage_report(self) -> dict:
        """Every instance's usage and cost (its slice's share of the device), one report."""
        from tokenmill.cost.report import usage_report

        trackers = list(self.usage.values())
        usage = {}
        for t in trackers:
            if t.accountant is not None:
                usage.update(t.accountant.snapshot())
        assert self._store is not None
        first = trackers[0]
        report = usage_report(usage, self._store.uptime(), first.catalog, first.prices)
        for row in report["instances"]:  # before its first uptime sample, its slice's share
            tracker = self.usage.get(row["instance"])
            if row["device_share"] is None and tracker is not None:
                row["device_share"] = tracker.share
        return report


class _FleetCollector(Collector):
    """Each replica's serving metrics with an `instance` label added, its usage series (which
    carry it already), and the fleet's own: instance up, restarts, outstanding tokens. Families
    of one name are merged: an exposition holds each name once."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}

        def add(family: Metric, instance: str | None) -> None:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for s in family.samples:
                labels = s.labels if instance is None else {**s.labels, "instance": instance}
                into.samples.append(s._replace(labels=labels))

        for name, metrics in self.fleet.metrics.items():
            for family in metrics.registry.collect():
                add(family, name)
        for tracker in self.fleet.usage.values():
            for family in tracker.collect():
                add(family, None)
        up = GaugeMetricFamily("tokenmill:instance_up", "1 while the instance serves, 0 while "
                               "it is down or restarting.", labels=["model_name", "instance"])  # fmt: skip
        restarts = GaugeMetricFamily(
            "tokenmill:instance_restarts", "Restarts of the instance by the supervisor.",
            labels=["model_name", "instance"],
        )  # fmt: skip
        outstanding = GaugeMetricFamily(
            "tokenmill:router_outstanding_tokens",
            "Tokens (prompt + max completion) of the requests routed to the instance and not "
            "finished.", labels=["model_name", "instance"],
        )  # fmt: skip
        load = self.fleet.router.load()
        for inst in self.fleet.instances:
            key = [inst.model_name, inst.name]
            up.add_metric(key, 1.0 if self.fleet.router.is_up(inst.name) else 0.0)
            restarts.add_metric(key, self.fleet.supervisor.restarts_of(inst.name))
            outstanding.add_metric(key, load[inst.name])
        yield from merged.values()
        yield from (up, restarts, outstanding)


def unavailable_seconds(e: Unavailable) -> str:
    """Retry-After: whole seconds, at least 1."""
    return str(max(1, int(e.retry_after + 0.999)))
