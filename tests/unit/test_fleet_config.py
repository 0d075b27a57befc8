"""FLEET.toml (tokenmill/fleet/config.py): every mistake is an error naming the instance and the
key, engine options are checked as the command line checks them, and the memory need the planner
uses counts the weights at their served width plus the KV budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.fleet.config import load_fleet, parse_fleet
from tokenmill.fleet.needs import memory_need, weight_elements
from tokenmill.partition.slices import Cores, MigSlice


def instance(**kw):
    return {"name": "chat", "model": "default", **kw}


def test_a_fleet_reads_back_with_its_options(tmp_path: Path):
    path = tmp_path / "FLEET.toml"
    path.write_text(
        '[[instances]]\nname = "chat"\nmodel = "default"\nslice = "cores=0"\n'
        'dtype = "bfloat16"\nkv_cache_memory = 268435456\nmax_model_len = 512\n\n'
        '[[instances]]\nname = "batch"\nmodel = "default"\nreplicas = 2\n'
        'slice = ["cores=1", "cores=2"]\n\n'
        '[[instances]]\nname = "gpu"\nmodel = "default"\nslice = "1g.18gb"\nreplicas = 3\n'
    )
    fleet = load_fleet(path)
    chat, batch, gpu = fleet.instances
    assert chat.slices == (Cores((0,)),) and chat.replicas == 1
    assert chat.engine == {"dtype": "bfloat16", "kv_cache_memory": 268435456, "max_model_len": 512}
    config = chat.engine_config()
    assert config.cache.kv_cache_memory == 268435456 and config.model.dtype == "bfloat16"
    assert batch.replica_names() == ["batch#0", "batch#1"]
    assert batch.slices == (Cores((1,)), Cores((2,)))
    assert gpu.slices == (MigSlice("1g.18gb"),) * 3
    assert fleet.instance("gpu") is gpu


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"instances": [instance()], "servers": 1}, "unknown top-level keys \\['servers'\\]"),
        ({}, "no \\[\\[instances\\]\\]"),
        ({"instances": [{"model": "default"}]}, "instance 1: `name`.*required"),
        ({"instances": [{"name": "x"}]}, "instance 'x': `model` is required"),
        (
            {"instances": [instance(colour="red")]},
            "instance 'chat': unknown engine option 'colour'",
        ),
        ({"instances": [instance(dtype="float8")]}, "instance 'chat': dtype must be one of"),
        ({"instances": [instance(kv_cache_memory=-1)]}, "kv_cache_memory must be > 0"),
        ({"instances": [instance(replicas=0)]}, "replicas must be an integer >= 1"),
        ({"instances": [instance(replicas=True)]}, "replicas must be an integer"),
        (
            {"instances": [instance(slice="two cores")]},
            "instance 'chat': slice 'two cores' is none of",
        ),
        ({"instances": [instance(slice=3)]}, "slice must be a string or a list"),
        ({"instances": [instance(replicas=2, slice=["cores=0"])]}, "1 slices for 2 replicas"),
        ({"instances": [instance(replicas=2, slice="cores=0")]}, "share one slice"),
        ({"instances": [instance(), instance()]}, "must be unique.*chat"),
    ],
)
def test_mistakes_name_the_instance_and_key(data, message):
    with pytest.raises(ValueError, match=message):
        parse_fleet(data)


def test_bad_toml_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "FLEET.toml"
    path.write_text("[[instances]\nname=")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_fleet(path)


def test_memory_need_counts_weights_at_their_width_and_the_kv_budget(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    numel = sum(n for _, n in weight_elements(path))
    linear = sum(n for name, n in weight_elements(path) if "_proj." in name)
    assert 0 < linear < numel
    fp32 = parse_fleet({"instances": [{"name": "a", "model": path, "dtype": "float32"}]})
    need, notes = memory_need(fp32.instances[0])
    assert need == 4 * numel and "weights only" in notes[0]
    int8 = parse_fleet({"instances": [{"name": "a", "model": path, "dtype": "bfloat16",
                                       "quantization": "int8", "kv_cache_memory": 1000}]})  # fmt: skip
    need, notes = memory_need(int8.instances[0])
    assert need == 2 * (numel - linear) + linear + 1000 and not notes
    default = parse_fleet({"instances": [{"name": "d", "model": "default", "dtype": "bfloat16"}]})
    need, _ = memory_need(default.instances[0])
    assert 250e6 < need < 300e6  # SmolLM2-135M in bf16 (the GGUF's tensors, dequantized)


def test_command_line_options_are_defaults_an_instance_overrides(tmp_path: Path):
    path = tmp_path / "FLEET.toml"
    path.write_text('[[instances]]\nname = "a"\nmodel = "default"\n\n'
                    '[[instances]]\nname = "b"\nmodel = "default"\ndtype = "bfloat16"\n')  # fmt: skip
    a, b = load_fleet(path, {"dtype": "float32", "max_model_len": 256}).instances
    assert a.engine == {"dtype": "float32", "max_model_len": 256}
    assert b.engine == {"dtype": "bfloat16", "max_model_len": 256}
    with pytest.raises(FileNotFoundError, match="no such fleet file"):
        load_fleet(tmp_path / "missing.toml")


def test_cost_shares_of_one_device_add_up_to_it():
    """A slice costs its own share; instances without one split what is left, or, where the
    slices take it all, count as one more part each, all scaled to the whole."""
    from tokenmill.fleet.instances import cost_shares
    from tokenmill.partition.planner import Placement

    def cores(name, share):
        return Placement(name, "cores", compute_share=share)

    shared = Placement("s", "shared")
    assert cost_shares([cores("a", 0.25), shared, shared]) == pytest.approx([0.25, 0.375, 0.375])
    assert cost_shares([cores("a", 0.5), cores("b", 0.5), shared]) == pytest.approx([0.375, 0.375, 0.25])  # fmt: skip
    assert cost_shares([shared, shared]) == pytest.approx([0.5, 0.5])
    assert cost_shares([cores("a", 0.5)]) == pytest.approx([0.5])  # the rest idles, unpaid
    mig = [Placement(f"m{i}", "1g.18gb", gpu=0, compute_share=1 / 7) for i in range(7)]
    assert cost_shares([*mig, shared]) == pytest.approx([1 / 7] * 7 + [1.0])  # CPU vs GPU 0


def test_serve_config_and_model_are_exclusive(tmp_path: Path, capsys):
    from tokenmill.cli import main

    path = tmp_path / "FLEET.toml"
    path.write_text('[[instances]]\nname = "a"\nmodel = "default"\n')
    assert main(["serve", "--config", str(path), "--model", "other"]) == 2
    assert "leave --model and --profile out" in capsys.readouterr().err
    assert main(["serve", "--config", str(path), "--served-model-name", "x", "--no-usage"]) == 2
    assert "each instance's `name` is its served model name" in capsys.readouterr().err


def test_an_instance_may_take_a_hardware_profile(tiny_model_dir):
    """`profile = "auto"`: the profile chosen for its model and this machine, under the
    instance's own options; the default takes none."""
    from tokenmill.fleet.instances import profiled
    from tokenmill.profiles.commands import choice_for

    model = str(tiny_model_dir("llama"))
    auto, plain = parse_fleet({"instances": [
        {"name": "a", "model": model, "profile": "auto", "max_model_len": 128},
        {"name": "b", "model": model, "max_model_len": 128},
    ]}).instances  # fmt: skip
    chosen = choice_for(model).chosen.options
    assert profiled(auto) == {**chosen, "max_model_len": 128}
    assert profiled(plain) == {"max_model_len": 128}
    with pytest.raises(ValueError, match="profile must be"):
        parse_fleet({"instances": [{"name": "c", "model": model, "profile": 3}]})


def test_replicas_get_their_own_disk_tier_and_a_cap_with_the_host_tier(tiny_model_dir, tmp_path):
    from tokenmill.fleet.instances import RUNTIME_BYTES, memory_cap, replica_options

    path = str(tiny_model_dir("llama"))
    fleet = parse_fleet({"instances": [{"name": "chat", "model": path, "dtype": "float32",
                                        "replicas": 2, "kv_cache_memory": 1000,
                                        "kv_host_memory": 5000, "kv_disk_dir": str(tmp_path)}]})  # fmt: skip
    (spec,) = fleet.instances
    dirs = {replica_options(spec, n)["kv_disk_dir"] for n in spec.replica_names()}
    assert dirs == {str(tmp_path / n) for n in spec.replica_names()} and len(dirs) == 2
    assert memory_cap(spec) == memory_need(spec)[0] + 5000 + RUNTIME_BYTES
