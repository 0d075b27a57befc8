"""TCO = (CapEx + OpEx x Time) / total tokens served.

CapEx is amortized straight-line over the hardware's lifetime; OpEx per hour is the energy drawn
(x price x PUE) plus any other hourly cost. Energy comes from a meter (measured or modeled,
energy.py), never from a guess here. Pure arithmetic; no torch.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

HOURS_PER_YEAR = 24 * 365
JOULES_PER_KWH = 3.6e6
DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")


@dataclass(frozen=True)
class Hardware:
    name: str
    capex_usd: float
    lifetime_years: float
    idle_watts: float
    peak_watts: float
    other_usd_per_hour: float = 0.0  # hosting, network, licences
    source: str = ""

    def __post_init__(self) -> None:
        if self.lifetime_years <= 0:
            raise ValueError(f"{self.name}: lifetime_years must be > 0")
        if not 0 <= self.idle_watts <= self.peak_watts:
            raise ValueError(f"{self.name}: need 0 <= idle_watts <= peak_watts")

    @property
    def capex_usd_per_hour(self) -> float:
        return self.capex_usd / (self.lifetime_years * HOURS_PER_YEAR)


@dataclass(frozen=True)
class Prices:
    usd_per_kwh: float = 0.12
    pue: float = 1.3


@dataclass(frozen=True)
class Cost:
    capex_usd: float  # amortized share for the period
    energy_usd: float
    other_usd: float
    tokens: int

    @property
    def total_usd(self) -> float:
        return self.capex_usd + self.energy_usd + self.other_usd

    @property
    def usd_per_million_tokens(self) -> float:
        return self.total_usd / self.tokens * 1e6 if self.tokens else float("inf")


def cost(hw: Hardware, prices: Prices, hours: float, joules: float, tokens: int) -> Cost:
    """Cost of serving `tokens` in `hours` of wall time that drew `joules` at the device."""
    energy_usd = joules / JOULES_PER_KWH * prices.usd_per_kwh * prices.pue
    return Cost(hw.capex_usd_per_hour * hours, energy_usd, hw.other_usd_per_hour * hours, tokens)


def load_catalog(
    user_file: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> tuple[dict[str, Hardware], Prices]:
    """The shipped catalogue, then a user TOML of the same shape, then explicit overrides
    ({"h100-sxm": {"capex_usd": 25000}, "prices": {"usd_per_kwh": 0.08}}), each field-wise."""
    data = tomllib.loads(DEFAULT_CATALOG.read_text())
    layers = [tomllib.loads(Path(user_file).read_text())] if user_file else []
    if overrides:
        prices = overrides.get("prices")
        hw = {k: v for k, v in overrides.items() if k != "prices"}
        layers.append({"hardware": hw, **({"prices": prices} if prices else {})})
    hardware = {n: Hardware(name=n, **v) for n, v in data["hardware"].items()}
    price = Prices(**data.get("prices", {}))
    for layer in layers:
        for name, fields in layer.get("hardware", {}).items():
            hardware[name] = (
                replace(hardware[name], **fields)
                if name in hardware
                else Hardware(name=name, **fields)
            )
        if "prices" in layer:
            price = replace(price, **layer["prices"])
    return hardware, price
