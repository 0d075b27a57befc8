"""Power meters behind one interface: cumulative joules since the meter started.

- RaplMeter: Intel/AMD package and DRAM energy counters in /sys/class/powercap (measured);
  counters wrap at max_energy_range_uj, which is handled.
- ModeledMeter: idle + (peak - idle) x utilization from the hardware catalogue, integrated over
  time (modeled: labelled so in every output, never presented as measured).
The engine's meters thread samples `read_joules()` at an interval.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


class Meter(ABC):
    label = "measured"  # or "modeled"

    @abstractmethod
    def read_joules(self) -> float:
        """Joules since the meter was created."""


@dataclass
class _Counter:
    path: Path
    max_uj: int
    last_uj: int
    total_uj: int = 0

    def advance(self) -> None:
        now = int(self.path.read_text())
        delta = now - self.last_uj
        if delta < 0:  # wrapped past max_energy_range_uj
            delta += self.max_uj + 1
        self.total_uj += delta
        self.last_uj = now


class RaplMeter(Meter):
    """Sum of the top-level package zones (and their dram subzones) under `root`."""

    def __init__(self, root: Path = POWERCAP) -> None:
        zones = sorted(p for p in root.glob("intel-rapl:*") if (p / "energy_uj").exists())
        wanted = [z for z in zones if _name(z).startswith("package") or _name(z) == "dram"]
        if not wanted:
            raise FileNotFoundError(f"no readable RAPL package counters under {root}")
        self.counters = [
            _Counter(
                z / "energy_uj",
                int((z / "max_energy_range_uj").read_text()),
                int((z / "energy_uj").read_text()),
            )
            for z in wanted
        ]
        self.zones = [_name(z) for z in wanted]

    def read_joules(self) -> float:
        for c in self.counters:
            c.advance()
        return sum(c.total_uj for c in self.counters) / 1e6


def _name(zone: Path) -> str:
    try:
        return (zone / "name").read_text().strip()
    except OSError:
        return ""


class ModeledMeter(Meter):
    label = "modeled"

    def __init__(
        self,
        idle_watts: float,
        peak_watts: float,
        utilization: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.idle_watts, self.peak_watts = idle_watts, peak_watts
        self.utilization, self.clock = utilization, clock
        self._last = clock()
        self._joules = 0.0

    def read_joules(self) -> float:
        """Integrates the power at the current utilization over the time since the last read."""
        now = self.clock()
        u = min(max(self.utilization(), 0.0), 1.0)
        self._joules += (self.idle_watts + (self.peak_watts - self.idle_watts) * u) * (
            now - self._last
        )
        self._last = now
        return self._joules
