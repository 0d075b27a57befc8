"""Reusable benchmark pieces: workloads, timers, machine ceilings. Thin scripts live in benchmarks/."""
