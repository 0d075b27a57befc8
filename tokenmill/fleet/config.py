"""FLEET.toml: the instances one `tokenmill serve --config FLEET.toml` runs.

    [[instances]]
    name = "chat"               # the served model name (what requests give as `model`)
    model = "default"           # an HF folder, a .gguf file, or 'default'
    slice = "cores=0"           # where it runs (partition/slices.py); a list: one per replica
    replicas = 1                # optional
    memory = "4GiB"             # optional: each replica's host-memory cap (a cgroup); default:
                                # its weights and KV budget + 1 GiB for the runtime
    profile = "auto"            # optional: a hardware profile's options under the instance's
                                # own (tokenmill profiles list); default none
    dtype = "bfloat16"          # any engine option by its config name (tokenmill serve --help)
    kv_cache_memory = 268435456

Checked once when read: unknown keys (of the file, of an instance) and bad values are errors
that name the instance and the key; engine options go through EngineConfig, as on the command
line. Pure: no torch.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.partition.cgroups import parse_bytes
from tokenmill.partition.slices import Cores, MigDevice, Slice, parse_slice

INSTANCE_KEYS = ("name", "model", "slice", "replicas", "memory", "profile")


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    model: str
    slices: tuple[Slice | None, ...]  # one per replica (None: no slice, the machine shared)
    engine: dict[str, Any] = field(default_factory=dict)  # engine options by config name
    memory: int | None = None  # each replica's memory cap in bytes (None: the default)
    profile: str = "none"  # a hardware profile (profiles/choose.py), applied when bound

    @property
    def replicas(self) -> int:
        return len(self.slices)

    def replica_names(self) -> list[str]:
        return [self.name] if self.replicas == 1 else [f"{self.name}#{i}" for i in range(self.replicas)]  # fmt: skip

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_kwargs(model=self.model, **self.engine)


@dataclass(frozen=True)
class FleetConfig:
    instances: tuple[InstanceSpec, ...]
    source: str = "FLEET.toml"

    def instance(self, name: str) -> InstanceSpec:
        for i in self.instances:
            if i.name == name:
                return i
        raise KeyError(name)


def load_fleet(path: str | Path, defaults: dict[str, Any] | None = None) -> FleetConfig:
    """`defaults`: engine options every instance gets unless it sets them (the command
    line's)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such fleet file")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML: {e}") from None
    return parse_fleet(data, str(p), defaults)


def parse_fleet(
    data: dict[str, Any], source: str = "FLEET.toml", defaults: dict[str, Any] | None = None
) -> FleetConfig:
    unknown = sorted(set(data) - {"instances"})
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {unknown}; a fleet is [[instances]] tables")  # fmt: skip
    tables = data.get("instances")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{source}: no [[instances]] table; each instance is one")
    instances = [_instance(t, i, source, defaults or {}) for i, t in enumerate(tables)]
    names = [i.name for i in instances]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{source}: instance names must be unique (they are the served model names): {dupes}")  # fmt: skip
    _check_exclusive(instances, source)
    return FleetConfig(tuple(instances), source)


def _instance(t: Any, index: int, source: str, defaults: dict[str, Any]) -> InstanceSpec:
    where = f"{source}: instance {index + 1}"
    if not isinstance(t, dict):
        raise ValueError(f"{where} is not a table")
    name = t.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: `name` (the served model name) is required, a string")
    where = f"{source}: instance {name!r}"
    model = t.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: `model` is required (an HF folder, a .gguf file or 'default')")
    replicas = t.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"{where}: replicas must be an integer >= 1, got {replicas!r}")
    raw = t.get("slice")
    if isinstance(raw, list):
        if len(raw) != replicas:
            raise ValueError(f"{where}: {len(raw)} slices for {replicas} replicas; give one each")
        texts: list[str | None] = list(raw)
    elif raw is None or isinstance(raw, str):
        texts = [raw] * replicas
    else:
        raise ValueError(f"{where}: slice must be a string or a list of strings, got {raw!r}")
    slices: list[Slice | None] = []
    for text in texts:
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: slice must be a string, got {text!r}")
        try:
            slices.append(None if text is None else parse_slice(text))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    engine = {**defaults, **{k: v for k, v in t.items() if k not in INSTANCE_KEYS}}
    memory = None
    if "memory" in t:
        try:
            memory = parse_bytes(t["memory"])
        except ValueError as e:
            raise ValueError(f"{where}: memory: {e}") from None
    profile = t.get("profile", "none")
    if not isinstance(profile, str) or not profile:
        raise ValueError(f"{where}: profile must be 'auto', 'none' or a profile name")
    spec = InstanceSpec(name, model, tuple(slices), engine, memory, profile)
    try:
        spec.engine_config()
    except TypeError as e:  # an unknown option: EngineConfig names it and the known ones
        raise ValueError(f"{where}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return spec


def _check_exclusive(instances: list[InstanceSpec], source: str) -> None:
    """Two replicas cannot both own one MIG device or one set of cores."""
    for spec in instances:
        fixed = [s for s in spec.slices if isinstance(s, MigDevice) or (isinstance(s, Cores) and not s.shared)]  # fmt: skip
        if len(set(fixed)) < len(fixed):
            raise ValueError(
                f"{source}: instance {spec.name!r}: its {spec.replicas} replicas share one "
                'slice; list one slice per replica (slice = ["cores=0", "cores=1"])'
            )
