"""The meter thread: reads a power meter every `interval_s` and hands the joules of each
interval to the accountant. One file or NVML read per interval: well under 1% of a core."""

from __future__ import annotations

import logging
import threading
import time

from tokenmill.cost.accounting import Accountant
from tokenmill.cost.energy import Meter

log = logging.getLogger(__name__)


class PowerSampler:
    def __init__(self, meter: Meter, accountant: Accountant, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"power sampling interval must be > 0 s, got {interval_s}")
        self.meter, self.accountant, self.interval_s = meter, accountant, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tokenmill-power", daemon=True)
        self._last_j = meter.read_joules()
        self._last_t = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        joules, now = self.meter.read_joules(), time.monotonic()
        self.accountant.record_energy(joules - self._last_j, now - self._last_t)
        self._last_j, self._last_t = joules, now

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a meter that fails once must not stop accounting
                log.exception("power sample failed")

    def stop(self) -> None:
        """Stop the thread and account the last partial interval."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sample()
