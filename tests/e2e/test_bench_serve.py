"""The load generator against a real server: every request accounted for, metrics sane."""

import json
import subprocess
import sys

from tests.e2e.conftest import API_KEY


def bench_serve(server, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "tokenmill.cli",
        "bench",
        "serve",
        "--base-url",
        server.url,
        "--api-key",
        API_KEY,
        "--dataset",
        "sharegpt-like",
        *args,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_bench_serve_accounts_for_every_request(server, tmp_path):
    out = tmp_path / "r.json"
    run = bench_serve(
        server,
        "--model",
        "tiny",
        "--num-prompts",
        "20",
        "--request-rate",
        "50",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--slo-ttft-ms",
        "60000",
        "--json-out",
        str(out),
    )
    r = json.loads(out.read_text())
    assert r["completed"] + r["failed"] == 20
    assert r["failed"] == 0, run.stdout
    assert r["total_output_tokens"] >= 20 * 4
    assert 0 < r["ttft_ms"]["median"] <= r["e2e_ms"]["median"]
    assert r["goodput"] == r["request_throughput"]
    assert "output_throughput" in run.stdout


def test_bench_serve_sweep_writes_plots(server, tmp_path):
    bench_serve(
        server,
        "--num-prompts",
        "6",
        "--sweep",
        "20,1000",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--plot-dir",
        str(tmp_path),
        "--json-out",
        str(tmp_path / "s.json"),
    )
    results = json.loads((tmp_path / "s.json").read_text())
    assert [r["config"]["request_rate"] for r in results] == [20.0, 1000.0]
    assert all(r["completed"] == 6 for r in results)
    png = (tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
