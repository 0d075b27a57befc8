"""Usage accounting, its SQLite store, cost reports, NVML metering and `tco plan`, by hand."""

from __future__ import annotations

import gc
import json
import time

import pytest

from tokenmill.cost.accounting import IDLE_TENANT, Accountant, Usage, UsageStore
from tokenmill.cost.commands import since_hour
from tokenmill.cost.energy import ModeledMeter, NvmlMeter, choose_meter
from tokenmill.cost.plan import plan, read_profile
from tokenmill.cost.report import usage_report
from tokenmill.cost.sampler import PowerSampler
from tokenmill.cost.tco import HOURS_PER_YEAR, Hardware, Prices

HW = {
    "box": Hardware(
        "box", capex_usd=4 * HOURS_PER_YEAR, lifetime_years=4, idle_watts=10, peak_watts=100
    )
}  # 1 USD per hour of CapEx
PRICES = Prices(usd_per_kwh=0.1, pue=1.0)


def test_energy_splits_by_tokens_and_adds_up():
    acc = Accountant("m", "i", "box", "modeled")
    acc.record_tokens("alice", 30, 0)
    acc.record_tokens("bob", 0, 10, requests=1)
    acc.record_energy(100.0, 1.0)
    acc.record_energy(5.0, 1.0)  # nothing served in this interval: idle
    snap = acc.snapshot()
    assert snap[("m", "i", "alice")].joules == pytest.approx(75.0)
    assert snap[("m", "i", "bob")].joules == pytest.approx(25.0)
    assert snap[("m", "i", IDLE_TENANT)].joules == pytest.approx(5.0)
    assert sum(u.joules for u in snap.values()) == pytest.approx(105.0)
    assert snap[("m", "i", "bob")].requests == 1 and acc.last_watts == pytest.approx(5.0)


def test_store_survives_a_restart(tmp_path):
    clock = iter(range(1000, 2000, 10)).__next__
    store = UsageStore(tmp_path / "u.sqlite")
    acc = Accountant("m", "i", "box", "modeled", store, clock=lambda: float(clock()))
    acc.record_tokens("alice", 5, 7, requests=1)
    acc.record_energy(3.0, 1.0)
    acc.record_tokens("alice", 0, 2, requests=1)
    acc.flush()
    before = acc.snapshot()
    store.close()
    store = UsageStore(tmp_path / "u.sqlite")
    again = Accountant("m", "i", "box", "modeled", store)
    assert again.snapshot() == before == {("m", "i", "alice"): Usage(2, 5, 9, 3.0)}
    assert Accountant("other", "i", "box", "modeled", store).snapshot() == {}  # own rows only
    seconds, hw, source, device_seconds = store.uptime()[("m", "i")]
    assert seconds == pytest.approx(20.0) and (hw, source) == ("box", "modeled")
    assert device_seconds == pytest.approx(20.0)  # the whole device


def test_an_instance_on_a_slice_costs_its_share_of_the_device(tmp_path):
    """Two instances on one box for the same hour, one on a quarter of it (a MIG slice, a
    core set): its hardware cost is a quarter of the other's; its energy is its own."""
    store = UsageStore(tmp_path / "u.sqlite")
    a, b = iter([0.0, 3600.0]), iter([0.0, 3600.0])  # created at 0, flushed an hour later
    whole = Accountant("m", "big", "box", "modeled", store, clock=lambda: next(a))
    small = Accountant("m", "small", "box", "modeled", store, clock=lambda: next(b), share=0.25)
    for acc in (whole, small):
        acc.record_tokens("t", 100, 100, requests=1)
        acc.flush()
    up = store.uptime()
    assert up[("m", "small")][0] == pytest.approx(3600.0)  # wall time: the same hour
    assert up[("m", "small")][3] == pytest.approx(900.0)  # a quarter of the device's
    r = usage_report({**whole.snapshot(), **small.snapshot()}, up, HW, PRICES)
    by = {i["instance"]: i for i in r["instances"]}
    assert by["big"]["cost_usd"] == pytest.approx(1.0)  # 1 h x 1 USD/h (HW: capex+other)
    assert by["small"]["cost_usd"] == pytest.approx(0.25)
    assert by["small"]["device_share"] == pytest.approx(0.25)
    assert by["small"]["uptime_hours"] == pytest.approx(1.0)


def test_a_store_from_before_shares_reads_as_whole_devices(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE uptime (hour INTEGER NOT NULL, model TEXT NOT NULL, instance TEXT NOT NULL,"
        " seconds REAL NOT NULL DEFAULT 0, hardware TEXT NOT NULL, energy_source TEXT NOT NULL,"
        " PRIMARY KEY (hour, model, instance));"
        "INSERT INTO uptime VALUES (1, 'm', 'i', 30.0, 'box', 'modeled');"
    )
    db.commit()
    db.close()
    store = UsageStore(path)
    assert store.uptime()[("m", "i")] == (30.0, "box", "modeled", 30.0)
    store.add(1, {}, ("m", "i", 10.0, "box", "modeled"), share=0.5)
    assert store.uptime()[("m", "i")] == (40.0, "box", "modeled", 35.0)


def test_report_hand_worked():
    usage = {
        ("m", "i", "alice"): Usage(3, 500, 250, 3.6e6),  # 1 kWh -> 0.10 USD
        ("m", "i", "bob"): Usage(1, 200, 50, 0.0),
    }
    r = usage_report(usage, {("m", "i"): (7200.0, "box", "modeled", 7200.0)}, HW, PRICES)
    by = {t["tenant"]: t for t in r["tenants"]}
    assert by["alice"]["cost_usd"] == pytest.approx(2 * 0.75 + 0.1)  # 2 h x 75% of tokens
    assert by["bob"]["cost_usd"] == pytest.approx(2 * 0.25)
    assert r["total"]["cost_usd"] == pytest.approx(2.1)
    assert r["total"]["cost_per_million_tokens"] == pytest.approx(2.1 / 1000 * 1e6)
    inst = r["instances"][0]
    assert inst["tokens_per_joule"] == pytest.approx(1000 / 3.6e6)
    assert {t["energy_source"] for t in r["tenants"]} == {"modeled"}


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, energy_mj: list[float] | None, power_mw: float = 0.0) -> None:
        self.energy, self.power = energy_mj, power_mw

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.energy is None:
            raise self.NVMLError("not supported")
        return self.energy.pop(0)

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power


def test_nvml_counter_and_sampled_power():
    meter = NvmlMeter(nvml=FakeNvml([5000.0, 7500.0, 9000.0]))
    assert meter.read_joules() == pytest.approx(2.5) and meter.read_joules() == pytest.approx(4.0)
    t = iter([0.0, 2.0, 3.0])
    sampled = NvmlMeter(nvml=FakeNvml(None, power_mw=300_000), clock=lambda: next(t))
    assert sampled.read_joules() == pytest.approx(600.0)  # 300 W for 2 s
    assert sampled.read_joules() == pytest.approx(900.0)
    assert meter.label == "measured: NVML"


def test_without_gpu_or_rapl_the_meter_is_modeled():
    meter = choose_meter("cpu", 10, 30, lambda: 0.5)
    if meter.label != "measured: RAPL":  # this machine has no /sys/class/powercap
        assert isinstance(meter, ModeledMeter) and meter.label == "modeled"


def test_sampler_is_cheap_and_accounts_the_last_interval(tmp_path):
    # CPU of this thread (start, stop, the last sample) plus the sampler thread's own clock:
    # whole-process time would also count whatever else the test process runs meanwhile, and a
    # garbage collection of the earlier tests' objects, which runs in whichever thread
    # allocates, would be charged to the sampler: collection is paused while measuring. (The
    # sampler's first interval starts when it is made: after the collection, with `wall`.)
    gc.collect()
    gc.disable()
    try:
        acc = Accountant("m", "i", "box", "modeled", UsageStore(tmp_path / "u.sqlite"))
        sampler = PowerSampler(ModeledMeter(10, 10, lambda: 0.0), acc, interval_s=0.5)
        main_cpu, wall = time.thread_time(), time.monotonic()
        sampler.start()
        time.sleep(2.0)
        thread_cpu = time.clock_gettime(time.pthread_getcpuclockid(sampler._thread.ident))
        sampler.stop()
        cpu = time.thread_time() - main_cpu + thread_cpu
        wall = time.monotonic() - wall
    finally:
        gc.enable()
    assert cpu < 0.01 * wall  # under 1% of a core
    assert acc.snapshot()[("m", "i", IDLE_TENANT)].joules == pytest.approx(10 * wall, rel=0.05)


def test_plan_hand_worked(tmp_path):
    (tmp_path / "fast.json").write_text(
        json.dumps({"output_throughput": 100.0, "ttft_ms": {"p99": 900.0}})
    )
    (tmp_path / "slow.json").write_text(json.dumps({"output_tokens_per_s": 10.0}))
    profiles = [
        read_profile(f"{tmp_path}/fast.json:box:fp8"),
        read_profile(f"{tmp_path}/slow.json:box"),
    ]
    rows = plan(profiles, HW, PRICES, tokens_per_day=8_640_000, slo_ttft_ms=500)
    fast, slow = rows
    assert fast["option"] == "fp8" and fast["instances"] == 1 and slow["instances"] == 10
    # 24 USD CapEx/day per instance; energy modeled at 100 W / (tokens/s)
    assert fast["usd_per_day"] == pytest.approx(24 + 8_640_000 * 1.0 / 3.6e6 * 0.1)
    assert fast["energy_source"] == "modeled" and fast["misses"] == ["ttft"]
    with pytest.raises(ValueError, match="catalogue"):
        plan([read_profile(f"{tmp_path}/fast.json:nope")], HW, PRICES, 1.0)


def test_since_parsing():
    assert since_hour("24h", now=100 * 3600) == 76
    assert since_hour("2d", now=100 * 3600) == 52
    assert since_hour(None) == 0
    with pytest.raises(ValueError, match="24h"):
        since_hour("yesterday")


def test_tco_commands_end_to_end(tmp_path, capsys):
    from tokenmill.cli import main

    (tmp_path / "a.json").write_text(json.dumps({"output_throughput": 50.0}))
    (tmp_path / "b.json").write_text(json.dumps({"output_tokens_per_s": 500.0}))
    plot = tmp_path / "plan.png"
    assert (
        main(
            [
                "tco",
                "plan",
                "--profile",
                f"{tmp_path}/a.json:cpu-2core:cpu",
                "--profile",
                f"{tmp_path}/b.json:l40s:gpu",
                "--tokens-per-day",
                "1e7",
                "--plot",
                str(plot),
                "--json",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("[") :])
    costs = [r["usd_per_million_tokens"] for r in rows]
    assert costs == sorted(costs) and {r["option"] for r in rows} == {"cpu", "gpu"}
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    db = tmp_path / "u.sqlite"
    acc = Accountant("m", "i", "cpu-2core", "modeled", UsageStore(db))
    acc.record_tokens("alice", 10, 20, requests=1)
    acc.record_energy(50.0, 2.0)
    assert main(["tco", "report", "--db", str(db), "--since", "24h", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tenants"][0]["tenant"] == "alice" and report["total"]["tokens"] == 30
    assert report["tenants"][0]["energy_source"] == "modeled"
    small = Accountant("m", "slice", "cpu-2core", "modeled", UsageStore(db), share=0.25)
    small.record_tokens("bob", 5, 5, requests=1)
    small.record_energy(10.0, 2.0)
    assert main(["tco", "report", "--db", str(db)]) == 0  # the table: instances with shares
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.split()[:2] == ["m", "slice"] and "cpu-2core" in line)
    assert row.split()[4] == "0.250"
    assert main(["tco", "report", "--db", str(tmp_path / "missing.sqlite")]) == 2


def test_usage_add_sums_every_field():
    """Usage.add is written out field by field (it runs for every streamed token): a field
    added to Usage and not to add() would silently stay zero."""
    from dataclasses import fields

    from tokenmill.cost.accounting import Usage

    a = Usage(**{f.name: i + 1 for i, f in enumerate(fields(Usage))})
    b = Usage(**{f.name: 10 * (i + 1) for i, f in enumerate(fields(Usage))})
    a.add(b)
    assert [getattr(a, f.name) for f in fields(Usage)] == [
        11 * (i + 1) for i in range(len(fields(Usage)))
    ]
