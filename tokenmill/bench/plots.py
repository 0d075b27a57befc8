"""PNG plots of serving benchmarks: latency CDFs of one run, and throughput / latency against
request rate for a sweep. matplotlib is imported here only (headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

from tokenmill.bench.metrics import RequestRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, title: str, path: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(records: list[RequestRecord], out_dir: str | Path, title: str) -> Path:
    """One figure, four panels: CDFs of TTFT, TPOT, ITL and end-to-end latency (ms)."""
    plt = _pyplot()
    done = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft for r in done if r.ttft is not None],
        "TPOT": [r.tpot for r in done if r.tpot is not None],
        "ITL": [g for r in done for g in r.itls],
        "end-to-end": [r.e2e for r in done if r.e2e is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items()):
        ms = sorted(1000 * v for v in values)
        if ms:
            ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))])
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.grid(alpha=0.3)
    return _save(plt, fig, title, Path(out_dir) / "latency_cdf.png")


def sweep(results: list[tuple[float, dict]], out_dir: str | Path, title: str) -> Path:
    """Output throughput and median/p99 TTFT and TPOT against the offered request rate."""
    plt = _pyplot()
    rates = [r for r, _ in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(rates, [res["output_throughput"] for _, res in results], marker="o")
    a.set_xlabel("request rate (req/s)")
    a.set_ylabel("output tokens/s")
    a.grid(alpha=0.3)
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
        for stat, style in (("median", "-o"), ("p99", "--x")):
            b.plot(rates, [res[key][stat] for _, res in results], style, label=f"{label} {stat}")
    b.set_xlabel("request rate (req/s)")
    b.set_ylabel("ms")
    b.set_yscale("log")
    b.legend()
    b.grid(alpha=0.3)
    return _save(plt, fig, title, Path(out_dir) / "sweep.png")


def scaling_efficiency(results: dict[str, list[dict]], path: str | Path, title: str) -> Path:
    """Scaling efficiency against chip count (log2 x): a line per link, TP solid, PP dashed;
    hollow markers where the weights and KV do not fit the chips."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (link, rows) in enumerate(results.items()):
        color = f"C{i}"
        for kind, style in (("tp", "-"), ("pp", "--")):
            pts = [r for r in rows if r["parallelism"] == kind]
            xs, ys = [r["chips"] for r in pts], [r["efficiency"] for r in pts]
            ax.plot(xs, ys, style, color=color, label=f"{kind.upper()} over {link}")
            ax.scatter(xs, ys, color=color, s=18,
                       facecolors=[color if r["fits"] else "none" for r in pts])  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chips")
    ax.set_ylabel("scaling efficiency T(1) / (n T(n))")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, title, Path(path))
