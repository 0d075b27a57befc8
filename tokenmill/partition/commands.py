"""`tokenmill partition list | plan`: the MIG tables, and whether a fleet fits a machine."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    p = sub.add_parser("partition", help="MIG tables and fleet placement plans")
    ps = p.add_subparsers(dest="partition", required=True)
    ls = ps.add_parser(
        "list",
        help="the MIG profiles of a GPU (or every GPU), and this machine's CPU cores",
        description="Each MIG profile: compute slices (of 7), memory slices (of 8) and the "
        "memory slice indices it may start at, SMs, memory, how many fit alone.",
    )
    ls.add_argument(
        "--device", default=None, help="a GPU (h200, h100-80gb, b200, ...); default all"
    )
    pl = ps.add_parser(
        "plan",
        help="check that a fleet's instances fit a machine, or propose their slices",
        description="Place every instance of FLEET.toml (each replica) on --gpus GPUs of "
        "--device and this machine's CPU cores: MIG profiles on memory slices, memory shares, "
        "core sets. An instance without a slice gets the smallest MIG profile that holds its "
        "weights and kv_cache_memory. Prints each instance's compute and memory share; exits 1 "
        "when the layout cannot be placed, naming why.",
    )
    pl.add_argument("--config", required=True, help="the fleet file (FLEET.toml)")
    pl.add_argument("--device", default="cpu", help="cpu (default), or a GPU model: h200, ...")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs of that model (default 1)")


def run(args: argparse.Namespace) -> int:
    from tokenmill.partition.profiles import cpu_topology, find_gpu, gpu_models

    if args.partition == "list":
        models = [find_gpu(args.device)] if args.device else list(gpu_models().values())
        for m in models:
            print(f"{m.key} ({m.memory_gb} GB; {m.sms_per_slice} SMs a compute slice)")
            print(f"  {'profile':12s} {'compute':>7s} {'memory':>6s} {'starts':14s} {'SMs':>4s} {'GB':>4s} {'max':>3s}")  # fmt: skip
            for q in m.profiles:
                starts = ",".join(map(str, q.starts))
                print(f"  {q.name:12s} {q.compute:>5d}/7 {q.memory_slices:>4d}/8 {starts:14s} "
                      f"{q.sms:>4d} {q.memory_gb:>4d} {q.max:>3d}")  # fmt: skip
        cpu = cpu_topology()
        nodes = "; ".join(f"node {n}: {','.join(map(str, c))}" for n, c in cpu.nodes.items())
        print(f"this machine: cores {','.join(map(str, cpu.cores))} ({nodes}), "
              f"{cpu.memory_bytes / (1 << 30):.1f} GB")  # fmt: skip
        return 0
    from tokenmill.fleet.config import load_fleet
    from tokenmill.fleet.needs import memory_need
    from tokenmill.partition.planner import Want, plan, table

    if args.gpus < 1:
        raise SystemExit("--gpus must be >= 1")
    fleet = load_fleet(args.config)
    wants, notes = [], []
    for spec in fleet.instances:
        need, more = memory_need(spec)
        notes += more
        wants += [Want(n, s, need) for n, s in zip(spec.replica_names(), spec.slices)]
    gpu = None if args.device == "cpu" else find_gpu(args.device)
    result = plan(wants, cpu_topology(), gpu, args.gpus)
    print(table(result))
    for n in notes:
        print(f"note: {n}")
    return 0 if result.ok else 1
