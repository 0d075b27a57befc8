"""TCO arithmetic against hand-worked cases; catalogue overrides; RAPL with a counter wrap on a
powercap tree laid out as the kernel does; the modeled meter's integration and label."""

import pytest

from tokenmill.cost.energy import ModeledMeter, RaplMeter
from tokenmill.cost.tco import Hardware, Prices, cost, load_catalog


def test_cost_hand_worked():
    hw = Hardware(
        "x",
        capex_usd=8760 * 4,
        lifetime_years=4,
        idle_watts=100,
        peak_watts=500,
        other_usd_per_hour=0.5,
    )
    assert hw.capex_usd_per_hour == pytest.approx(1.0)
    # 2 hours, 3.6e6 J = 1 kWh at $0.10 x PUE 1.5 = $0.15; capex $2; other $1; 1e6 tokens
    c = cost(hw, Prices(usd_per_kwh=0.10, pue=1.5), hours=2, joules=3.6e6, tokens=1_000_000)
    assert c.capex_usd == pytest.approx(2.0) and c.energy_usd == pytest.approx(0.15)
    assert c.other_usd == pytest.approx(1.0) and c.total_usd == pytest.approx(3.15)
    assert c.usd_per_million_tokens == pytest.approx(3.15)
    assert cost(hw, Prices(), 1, 0, 0).usd_per_million_tokens == float("inf")


def test_catalogue_ships_documented_values_and_overrides(tmp_path):
    hardware, prices = load_catalog()
    assert {"h100-sxm", "h200-sxm", "b200", "l40s"} <= set(hardware)
    assert all(h.source for h in hardware.values())
    user = tmp_path / "mine.toml"
    user.write_text(
        "[hardware.h100-sxm]\ncapex_usd = 20000\n[hardware.mybox]\ncapex_usd = 1\n"
        "lifetime_years = 1\nidle_watts = 1\npeak_watts = 2\n[prices]\npue = 1.1\n"
    )
    hw2, p2 = load_catalog(
        user, {"h100-sxm": {"lifetime_years": 5}, "prices": {"usd_per_kwh": 0.2}}
    )
    assert hw2["h100-sxm"].capex_usd == 20000 and hw2["h100-sxm"].lifetime_years == 5
    assert hw2["h100-sxm"].peak_watts == hardware["h100-sxm"].peak_watts  # untouched fields kept
    assert hw2["mybox"].peak_watts == 2
    assert p2 == prices.__class__(usd_per_kwh=0.2, pue=1.1)
    with pytest.raises(ValueError, match="idle_watts"):
        Hardware("bad", 1, 1, idle_watts=5, peak_watts=1)


def zone(root, name, zid, energy, max_range):
    d = root / f"intel-rapl:{zid}"
    d.mkdir()
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    return d


def test_rapl_sums_package_and_dram_and_handles_wrap(tmp_path):
    pkg = zone(tmp_path, "package-0", "0", 1_000_000, 262_143_328_850)
    core = zone(tmp_path, "core", "0:0", 500, 262_143_328_850)
    dram = zone(tmp_path, "dram", "0:1", 262_143_000_000, 262_143_328_850)
    meter = RaplMeter(tmp_path)
    assert meter.label == "measured: RAPL" and sorted(meter.zones) == ["dram", "package-0"]
    assert meter.read_joules() == 0.0
    (pkg / "energy_uj").write_text("3000000\n")  # +2 J
    (core / "energy_uj").write_text("900000000\n")  # ignored: inside the package already
    (dram / "energy_uj").write_text("671150\n")  # wrapped: +328850 to the max, +1, +671150 -> ~1 J
    assert meter.read_joules() == pytest.approx(2.0 + (328_850 + 1 + 671_150) / 1e6)


def test_rapl_without_counters_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="RAPL"):
        RaplMeter(tmp_path)


def test_modeled_meter_integrates_power_and_says_modeled():
    t = [0.0]
    u = [0.0]
    meter = ModeledMeter(
        idle_watts=100, peak_watts=300, utilization=lambda: u[0], clock=lambda: t[0]
    )
    assert meter.label == "modeled"
    t[0], u[0] = 10.0, 0.5  # 10 s at 200 W
    assert meter.read_joules() == pytest.approx(2000.0)
    t[0], u[0] = 12.0, 2.0  # clamped to 1: 2 s at 300 W
    assert meter.read_joules() == pytest.approx(2600.0)
