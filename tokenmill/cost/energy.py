"""Power meters behind one interface: cumulative joules since the meter started.

- NvmlMeter: NVIDIA GPUs through NVML (nvidia-ml-py): the total-energy counter where the GPU has
  one (Volta and later), else power samples integrated over time (trapezoids). MIG instances
  share their GPU's counter: NVML reports no per-instance power, so an instance's share must be
  apportioned (by tokens, as accounting.py does), never read.
- RaplMeter: Intel/AMD package and DRAM energy counters in /sys/class/powercap (measured);
  counters wrap at max_energy_range_uj, which is handled.
- ModeledMeter: idle + (peak - idle) x utilization from the hardware catalogue, integrated over
  time (modeled: labelled so in every output, never presented as measured).
The engine's meters thread samples `read_joules()` at an interval.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


class Meter(ABC):
    label = "measured"  # "measured: <source>" or "modeled"

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

    label = "measured: RAPL"

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


class NvmlMeter(Meter):
    """Energy of the GPUs `indices` (default: all) through NVML; `nvml` is the pynvml module."""

    label = "measured: NVML"

    def __init__(self, indices: list[int] | None = None, nvml=None, clock=time.monotonic):
        if nvml is None:
            nvml = importlib.import_module("pynvml")  # nvidia-ml-py; imported here only
        self.nvml, self.clock = nvml, clock
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices or range(count)]
        if not self.handles:
            raise FileNotFoundError("NVML sees no GPU")
        self.start_mj: list[float | None] = [self._energy_mj(h) for h in self.handles]
        self.last_t = clock()
        self.last_w = [
            self._power_w(h) if mj is None else 0.0 for h, mj in zip(self.handles, self.start_mj)
        ]
        self.sampled_j = 0.0

    def _energy_mj(self, handle) -> float | None:
        try:
            return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except self.nvml.NVMLError:
            return None  # no energy counter on this GPU: sample power instead

    def _power_w(self, handle) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0

    def read_joules(self) -> float:
        now = self.clock()
        dt, self.last_t = now - self.last_t, now
        total = 0.0
        for i, (handle, start) in enumerate(zip(self.handles, self.start_mj)):
            if start is not None:
                total += (self._energy_mj(handle) or start) - start
            else:
                watts = self._power_w(handle)
                self.sampled_j += (watts + self.last_w[i]) / 2 * dt
                self.last_w[i] = watts
        return total / 1000.0 + self.sampled_j


class ShareMeter(Meter):
    """An instance's part of a meter that reads a whole device (RAPL's package, NVML's GPU) it
    shares with other instances: `share` of the joules (its slice's share of the device), so
    the instances of one device add up to what it drew instead of each claiming all of it."""

    def __init__(self, meter: Meter, share: float) -> None:
        self.meter, self.share = meter, share
        self.label = f"{meter.label} x {share:.3g} (slice share)"

    def read_joules(self) -> float:
        return self.meter.read_joules() * self.share


def choose_meter(device_type: str, idle_watts: float, peak_watts: float, utilization) -> Meter:
    """NVML on CUDA, else RAPL where readable, else the declared model (labelled modeled)."""
    if device_type == "cuda":
        try:
            return NvmlMeter()
        except Exception:  # no nvidia-ml-py, no driver, or no permission
            pass
    try:
        return RaplMeter()
    except (OSError, ValueError):
        return ModeledMeter(idle_watts, peak_watts, utilization)
