"""The supervisor: an instance whose engine core died is marked down in the router (its model
answers 503 with Retry-After while no replica of it is up) and restarted after a backoff that
doubles with each failure in a row (0.5 s, 1 s, 2 s, ... at most 30 s; reset once it has served
for a minute), while the other instances keep serving. A death is what the engine's client
reports: the core process exited, crashed or closed its pipe (its in-flight requests fail with
EngineDeadError at once). A hung core, alive but silent for `hang_after` seconds while requests
are in flight (a step of a long prefill sends nothing for its length: keep it generous), is
killed and handled as dead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.fleet.instances import Instance, start
from tokenmill.fleet.router import Router

log = logging.getLogger(__name__)


@dataclass
class _Watch:
    failures: int = 0  # deaths (or failed restarts) in a row
    restart_at: float | None = None  # when the next restart is due (None: serving)
    up_since: float | None = None
    start_s: float = 5.0  # how long its last start took (for Retry-After)
    restarts: int = 0


def restart(inst: Instance) -> None:
    """The dead engine released, a new bound engine core started in its place."""
    if inst.engine is not None:
        inst.engine.shutdown(1.0)  # type: ignore[attr-defined]
        inst.engine = None
    start([inst])


class Supervisor:
    def __init__(
        self,
        instances: list[Instance],
        router: Router,
        restart_fn: Callable[[Instance], None] = restart,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        healthy_after: float = 60.0,
        hang_after: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instances, self.router, self.restart_fn = instances, router, restart_fn
        self.base_delay, self.max_delay, self.healthy_after = base_delay, max_delay, healthy_after
        self.clock, self.hang_after = clock, hang_after
        self.kills = 0
        now = clock()
        self._watch = {i.name: _Watch(up_since=now) for i in instances}
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _down(self, inst: Instance, w: _Watch, now: float, why: str) -> None:
        delay = min(self.max_delay, self.base_delay * 2**w.failures)
        w.failures += 1
        w.restart_at, w.up_since = now + delay, None
        self.router.mark_down(inst.name, retry_after=delay + w.start_s)
        log.warning("instance %s is down (%s); restart %d in %.1f s", inst.name, why, w.failures, delay)  # fmt: skip

    def check(self) -> None:
        """One pass over the instances: notice deaths, restart those whose backoff is over."""
        for inst in self.instances:
            w = self._watch[inst.name]
            now = self.clock()
            if w.restart_at is None:
                engine = inst.engine
                if engine is not None and not engine.is_dead and self._hung(inst):  # type: ignore[attr-defined]
                    continue  # killed: the client reports the death on a later check
                if engine is not None and not engine.is_dead:  # type: ignore[attr-defined]
                    if w.failures and w.up_since is not None and now - w.up_since >= self.healthy_after:  # fmt: skip
                        w.failures = 0
                    continue
                reason = getattr(getattr(engine, "client", None), "dead_reason", None)
                self._down(inst, w, now, reason or "no engine")
                continue
            if now < w.restart_at:
                continue
            t = time.perf_counter()
            try:
                self.restart_fn(inst)
            except Exception as e:  # noqa: BLE001 - a failed restart is retried, later
                self._down(inst, w, self.clock(), f"restart failed: {type(e).__name__}: {e}")
                continue
            w.start_s = time.perf_counter() - t
            w.restart_at, w.up_since = None, self.clock()
            self.restarts += 1
            w.restarts += 1
            self.router.mark_up(inst.name)
            log.info("instance %s is back (started in %.1f s)", inst.name, w.start_s)

    def restarts_of(self, name: str) -> int:
        return self._watch[name].restarts

    def _hung(self, inst: Instance) -> bool:
        """Kill a core that is alive and silent with requests in flight; True if it did."""
        engine = inst.engine
        stalled = engine.stalled_for()  # type: ignore[attr-defined]
        if stalled <= self.hang_after:
            return False
        process = getattr(engine.client, "process", None)  # type: ignore[attr-defined]
        if process is None or not process.is_alive():
            return False
        log.warning("instance %s: no progress for %.0f s with requests in flight; killing its core",
                    inst.name, stalled)  # fmt: skip
        process.kill()
        self.kills += 1
        return True

    def run(self, interval: float = 0.25) -> None:
        """Check every `interval` seconds on a thread of its own, until `stop`."""

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check()
                except Exception:  # never let the watcher die
                    log.exception("supervisor check failed")

        self._thread = threading.Thread(target=loop, name="tokenmill-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
