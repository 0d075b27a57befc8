"""`tokenmill profiles list`, and `--profile` for serve / generate."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("tokenmill.profiles")


def add_parsers(sub) -> None:
    p = sub.add_parser("profiles", help="the engine profiles for a model on this machine")
    ps = p.add_subparsers(dest="profiles", required=True)
    ls = ps.add_parser(
        "list",
        help="candidate profiles, whether each fits, why, and the one chosen",
        description="For --model on this machine (or a described one, --hardware FILE.json: "
        "cpu_flags, cores, memory_gb, gpus: [{name, capability, memory_gb, mig}]): each "
        "candidate profile's engine options (dtype, quantization, KV budget), its weight "
        "memory, whether it fits, the reasons, and the one `serve --profile auto` takes.",
    )
    ls.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    ls.add_argument("--hardware", default=None, help="a JSON description instead of this machine")


def add_profile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        default="auto",
        help="engine profile: auto (chosen for the model and this machine, printed at start), "
        "none (the plain defaults), or a name from `tokenmill profiles list`; options given on "
        "the command line win over the profile's",
    )


def machine(hardware: str | None = None):
    from tokenmill.profiles.hardware import GpuInfo, detect_cpu, load_hardware

    if hardware:
        return load_hardware(hardware)
    hw = detect_cpu()
    try:
        import torch

        if torch.cuda.is_available():
            gpus = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append(GpuInfo(props.name, (props.major, props.minor), props.total_memory))
            from dataclasses import replace

            hw = replace(hw, gpus=tuple(gpus))
    except ImportError:
        pass
    return hw


def choice_for(model: str, hardware: str | None = None):
    from tokenmill.fleet.needs import model_size
    from tokenmill.profiles.choose import choose

    return choose(model_size(model), machine(hardware))


def run(args: argparse.Namespace) -> int:
    c = choice_for(args.model, args.hardware)
    print(c.hardware.describe())
    for p in c.profiles:
        mark = "*" if p.chosen else " "
        opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in p.options.items())
        state = "fits" if p.fits else "does NOT fit"
        print(f"{mark} {p.name:12s} {opts}  ({state}, weights {p.weight_bytes / 2**30:.2f} GB)")
        for r in p.reasons:
            print(f"      {r}")
    print("* the one chosen (serve --profile auto); --profile NAME takes another")
    return 0


def apply_profile(name: str, model: str, given: dict) -> dict:
    """Engine options: the profile's (auto: the chosen one) under those `given` explicitly;
    `none`: `given` alone. Logs the profile taken."""
    if name == "none":
        return given
    try:
        c = choice_for(model)
    except (ValueError, OSError) as e:  # the loader reports a bad model path its own way
        if name != "auto":
            raise
        log.warning("no profile for %s (%s): the plain defaults", model, e)
        return given
    p = c.chosen if name == "auto" else c.profile(name)
    taken = {k: v for k, v in p.options.items() if k not in given}
    log.info("profile %s%s: %s; weights %.2f GB (%s)", p.name, " (auto)" if name == "auto" else "",
             " ".join(f"{k}={v}" for k, v in taken.items()) or "nothing to set",
             p.weight_bytes / 2**30, "; ".join(p.reasons))  # fmt: skip
    return {**taken, **given}
