"""The live display of `tokenmill bench serve`: a rich progress bar with what a load test needs
to see while it runs: requests done, in flight and failed, output tokens/s so far, median TTFT."""

from __future__ import annotations

import statistics
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenmill.bench.metrics import RequestRecord


class LoadProgress:
    def __init__(self, total: int, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn(
                "in flight {task.fields[in_flight]}  failed {task.fields[failed]}  "
                "{task.fields[tps]:.1f} out tok/s  TTFT p50 {task.fields[ttft_ms]:.0f} ms"
            ),
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(
            "load", total=total, in_flight=0, failed=0, tps=0.0, ttft_ms=0.0
        )
        self.start = time.monotonic()
        self.in_flight = 0
        self.done: list[RequestRecord] = []

    def __enter__(self) -> LoadProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def sent(self) -> None:
        self.in_flight += 1
        self.progress.update(self.task, in_flight=self.in_flight)

    def finished(self, rec: RequestRecord) -> None:
        self.in_flight -= 1
        self.done.append(rec)
        ok = [r for r in self.done if r.ok]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.progress.update(
            self.task,
            advance=1,
            in_flight=self.in_flight,
            failed=len(self.done) - len(ok),
            tps=sum(r.output_tokens for r in ok) / elapsed,
            ttft_ms=1000 * statistics.median(ttfts) if ttfts else 0.0,
        )
