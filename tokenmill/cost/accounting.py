"""Usage accounting while serving: tokens, requests and energy per model, instance and tenant.

The accountant hears of tokens as they are produced (`record_tokens`, from every engine output)
and of energy from the meter thread (`record_energy`, the joules of one sampling interval). The
joules of an interval are split over the tenants in proportion to the tokens (prompt +
generated) they were served in that interval; an interval with no tokens is charged to the
tenant "(idle)", so the split always adds up to what the meter read. Cost is not stored: it is
derived from tokens, energy and uptime with the TCO catalogue when asked (`usage_report`).

`UsageStore` keeps hourly rows in SQLite so that a restart loses nothing; the accountant flushes
its deltas there at every energy sample and on close. Pure Python: no torch.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IDLE_TENANT = "(idle)"
SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL,          -- unix time // 3600
    model TEXT NOT NULL, instance TEXT NOT NULL, tenant TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    joules REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, model, instance, tenant)
);
CREATE TABLE IF NOT EXISTS uptime (
    hour INTEGER NOT NULL, model TEXT NOT NULL, instance TEXT NOT NULL,
    seconds REAL NOT NULL DEFAULT 0, hardware TEXT NOT NULL, energy_source TEXT NOT NULL,
    device_seconds REAL NOT NULL DEFAULT 0, -- seconds x the instance's share of the device
    PRIMARY KEY (hour, model, instance)
);
"""


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    joules: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:  # every streamed token: plain adds, no fields() walk
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.joules += other.joules


Key = tuple[str, str, str]  # (model, instance, tenant)
Uptime = tuple[float, str, str, float]  # seconds, hardware, energy source, device seconds


class UsageStore:
    """Hourly usage rows in SQLite (one file, safe to share between restarts)."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(uptime)")}
        if "device_seconds" not in columns:  # a store from before instances had shares
            with self.db:
                self.db.execute("ALTER TABLE uptime ADD COLUMN device_seconds REAL NOT NULL DEFAULT 0")  # fmt: skip
                self.db.execute("UPDATE uptime SET device_seconds = seconds")
        self.lock = threading.Lock()

    def add(
        self,
        hour: int,
        rows: dict[Key, Usage],
        uptime: tuple[str, str, float, str, str],
        share: float = 1.0,
    ) -> None:
        """Add deltas (upsert) and `uptime` = (model, instance, seconds, hardware, source) of
        an instance that holds `share` of its device (a slice: its cost is that share)."""
        with self.lock, self.db:
            for (model, instance, tenant), u in rows.items():
                self.db.execute(
                    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO UPDATE SET requests = requests + excluded.requests, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens, "
                    "joules = joules + excluded.joules",
                    (
                        hour,
                        model,
                        instance,
                        tenant,
                        u.requests,
                        u.prompt_tokens,
                        u.completion_tokens,
                        u.joules,
                    ),
                )
            model, instance, seconds, hardware, source = uptime
            self.db.execute(
                "INSERT INTO uptime (hour, model, instance, seconds, hardware, energy_source, "
                "device_seconds) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "seconds = seconds + excluded.seconds, hardware = excluded.hardware, "
                "energy_source = excluded.energy_source, "
                "device_seconds = device_seconds + excluded.device_seconds",
                (hour, model, instance, seconds, hardware, source, seconds * share),
            )

    def usage(self, since_hour: int = 0) -> dict[Key, Usage]:
        with self.lock:
            rows = self.db.execute(
                "SELECT model, instance, tenant, SUM(requests), SUM(prompt_tokens), "
                "SUM(completion_tokens), SUM(joules) FROM usage WHERE hour >= ? "
                "GROUP BY model, instance, tenant",
                (since_hour,),
            ).fetchall()
        return {(m, i, t): Usage(r, p, c, j) for m, i, t, r, p, c, j in rows}

    def uptime(self, since_hour: int = 0) -> dict[tuple[str, str], Uptime]:
        """(model, instance) -> (seconds, hardware, energy source of the latest row, device
        seconds: the seconds x the share of the device the instance held)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT model, instance, SUM(seconds), MAX(hour), SUM(device_seconds) FROM uptime "
                "WHERE hour >= ? GROUP BY model, instance",
                (since_hour,),
            ).fetchall()
            out = {}
            for model, instance, seconds, hour, device_seconds in rows:
                hw, src = self.db.execute(
                    "SELECT hardware, energy_source FROM uptime WHERE hour = ? AND model = ? "
                    "AND instance = ?",
                    (hour, model, instance),
                ).fetchone()
                out[(model, instance)] = (seconds, hw, src, device_seconds)
        return out

    def close(self) -> None:
        self.db.close()


class Accountant:
    """Live totals for one served model on one instance; thread-safe."""

    def __init__(
        self,
        model: str,
        instance: str,
        hardware: str,
        energy_source: str,
        store: UsageStore | None = None,
        clock: Callable[[], float] = time.time,
        share: float = 1.0,
    ) -> None:
        """`share`: the fraction of the device this instance holds (its slice); its uptime
        costs that fraction of the device's hourly cost."""
        self.model, self.instance, self.share = model, instance, share
        self.hardware, self.energy_source = hardware, energy_source
        self.store, self.clock = store, clock
        self.lock = threading.Lock()
        self.totals: dict[Key, Usage] = defaultdict(Usage)  # since the store began
        if store is not None:  # carry on from before a restart (this model and instance only)
            for key, usage in store.usage().items():
                if key[:2] == (model, instance):
                    self.totals[key].add(usage)
        self.pending: dict[Key, Usage] = defaultdict(Usage)  # not yet in the store
        self.interval_tokens: dict[str, int] = defaultdict(int)  # tenant -> tokens this interval
        self.last_flush = clock()
        self.last_watts = 0.0

    def _key(self, tenant: str) -> Key:
        return (self.model, self.instance, tenant)

    def record_tokens(self, tenant: str, prompt: int, completion: int, requests: int = 0) -> None:
        delta = Usage(requests, prompt, completion)
        with self.lock:
            for table in (self.totals, self.pending):
                table[self._key(tenant)].add(delta)
            self.interval_tokens[tenant] += prompt + completion

    def record_energy(self, joules: float, seconds: float) -> None:
        """Split one meter interval's joules over its tenants, then flush to the store."""
        with self.lock:
            weights = dict(self.interval_tokens) or {IDLE_TENANT: 1}
            total = sum(weights.values())
            for tenant, tokens in weights.items():
                share = Usage(joules=joules * tokens / total)
                self.totals[self._key(tenant)].add(share)
                self.pending[self._key(tenant)].add(share)
            self.interval_tokens.clear()
            self.last_watts = joules / seconds if seconds > 0 else 0.0
        self.flush()

    def flush(self) -> None:
        now = self.clock()
        with self.lock:
            pending, self.pending = dict(self.pending), defaultdict(Usage)
            elapsed, self.last_flush = now - self.last_flush, now
        if self.store is not None:
            uptime = (self.model, self.instance, elapsed, self.hardware, self.energy_source)
            self.store.add(int(now // 3600), pending, uptime, self.share)

    def snapshot(self) -> dict[Key, Usage]:
        with self.lock:
            out: dict[Key, Usage] = {}
            for key, usage in self.totals.items():
                copy = Usage()
                copy.add(usage)
                out[key] = copy
            return out
