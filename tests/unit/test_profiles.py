"""Hardware profiles (tokenmill/profiles/): for fake CPUs and GPUs the candidates, which fit, and
the one chosen; the command and `--profile` on the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.profiles.choose import GB, ModelSize, choose
from tokenmill.profiles.commands import apply_profile
from tokenmill.profiles.hardware import GpuInfo, Hardware, detect_cpu, load_hardware

SPR = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16"})  # fmt: skip
ZEN2 = frozenset({"avx2", "fma"})
SMALL = ModelSize(linear=100_000_000, other=35_000_000, gguf_bytes=98_000_000)  # ~SmolLM2-135M
BIG = ModelSize(linear=64_000_000_000, other=6_000_000_000)  # a 70B model


def names(c):
    return [p.name for p in c.profiles]


def test_a_bf16_cpu_takes_bf16_and_lists_the_others():
    c = choose(SMALL, Hardware(SPR, 2, 24 * GB))
    assert c.chosen.name == "cpu-bf16" and c.chosen.options == {"dtype": "bfloat16"}
    assert names(c) == ["cpu-bf16", "cpu-fp32", "cpu-int8", "cpu-int4", "cpu-gguf"]
    assert all(p.fits for p in c.profiles)
    assert c.profile("cpu-int4").options == {"dtype": "bfloat16", "quantization": "int4"}
    assert c.profile("cpu-int4").weight_bytes < c.profile("cpu-bf16").weight_bytes / 2


def test_a_cpu_without_bf16_takes_fp32_and_says_why():
    c = choose(SMALL, Hardware(ZEN2, 8, 32 * GB))
    assert c.chosen.name == "cpu-fp32" and "no native bf16" in c.chosen.reasons[0]
    assert "cpu-bf16" not in names(c)
    assert any("no AVX-512" in r for r in c.profile("cpu-int4").reasons)
    assert c.profile("cpu-int8").options["dtype"] == "float32"


def test_tight_memory_shrinks_the_kv_budget_then_the_weights():
    mid = choose(SMALL, Hardware(SPR, 2, int(1.5 * GB)))  # bf16 fits, with less KV than 4 GB
    kv = mid.chosen.options["kv_cache_memory"]
    assert mid.chosen.name == "cpu-bf16" and 256 << 20 <= kv < 4 * GB
    assert any("KV budget" in r for r in mid.chosen.reasons)
    tiny = choose(SMALL, Hardware(SPR, 2, int(0.6 * GB)))  # bf16 weights leave no KV room
    assert not tiny.profile("cpu-bf16").fits and tiny.chosen.name == "cpu-int8"
    tinier = choose(SMALL, Hardware(SPR, 2, int(0.45 * GB)))  # only the file's own codes fit
    assert tinier.chosen.name == "cpu-gguf" and tinier.chosen.fits
    none = choose(BIG, Hardware(SPR, 2, 16 * GB))
    assert not any(p.fits for p in none.profiles)
    assert none.chosen.name == "cpu-gguf" or none.chosen.weight_bytes == min(p.weight_bytes for p in none.profiles)  # fmt: skip


@pytest.mark.parametrize(
    ("capability", "half", "has_fp8", "has_nvfp4"),
    [((7, 0), "float16", False, False), ((8, 0), "bfloat16", False, False),
     ((9, 0), "bfloat16", True, False), ((10, 0), "bfloat16", True, True)],
)  # fmt: skip
def test_gpu_profiles_follow_the_compute_capability(capability, half, has_fp8, has_nvfp4):
    gpu = GpuInfo("NVIDIA X", capability, 80 * GB)
    c = choose(SMALL, Hardware(SPR, 16, 128 * GB, (gpu,)))
    assert c.chosen.options == {"dtype": half}
    assert ("cuda-fp8" in names(c)) == has_fp8 and ("cuda-nvfp4" in names(c)) == has_nvfp4
    assert ("cuda-w8a8" in names(c)) == (capability >= (8, 0))


def test_a_70b_model_on_one_h100_takes_int4_and_says_what_tp_the_rest_need():
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 80 * GB, mig=True)
    c = choose(BIG, Hardware(SPR, 16, 512 * GB, (h100,)))
    assert c.chosen.name == "cuda-int4"
    bf16 = c.profile("cuda-bf16")
    assert not bf16.fits and bf16.tensor_parallel_size == 4
    assert any("tensor_parallel_size=4" in r for r in bf16.reasons)
    assert c.profile("cuda-fp8").tensor_parallel_size == 2
    assert any("MIG mode" in r for r in c.chosen.reasons)


def test_a_70b_model_on_eight_h100s_takes_bf16_over_four_of_them():
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 80 * GB)
    c = choose(BIG, Hardware(SPR, 16, 512 * GB, (h100,) * 8))
    assert c.chosen.name == "cuda-bf16"
    assert c.chosen.options == {"dtype": "bfloat16", "tensor_parallel_size": 4}
    assert any("split over 4 of the 8 GPUs" in r for r in c.chosen.reasons)
    two = choose(BIG, Hardware(SPR, 16, 512 * GB, (h100,) * 2))  # fp8 fits two, bf16 does not
    assert two.chosen.name == "cuda-fp8" and two.chosen.options["tensor_parallel_size"] == 2
    assert not two.profile("cuda-bf16").fits


def test_described_hardware_files(tmp_path: Path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"cpu_flags": ["avx2"], "cores": 4, "memory_gb": 16,
                                "gpus": [{"name": "NVIDIA H200", "capability": "9.0", "memory_gb": 141}]}))  # fmt: skip
    hw = load_hardware(path)
    assert hw.gpus[0].capability == (9, 0) and hw.gpus[0].memory_bytes == 141 * GB
    assert "GPU 0 NVIDIA H200 (sm_90, 141 GB)" in hw.describe()
    path.write_text(json.dumps({"cpus": 4}))
    with pytest.raises(ValueError, match="unknown keys \\['cpus'\\]"):
        load_hardware(path)
    path.write_text(json.dumps({"gpus": [{"name": "x", "capability": "9", "memory_gb": 1}]}))
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        load_hardware(path)
    here = detect_cpu()
    assert here.cores >= 1 and here.memory_bytes > 0 and here.cpu_flags


def test_given_options_win_over_the_profile(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    assert apply_profile("none", path, {"dtype": "float32"}) == {"dtype": "float32"}
    auto = apply_profile("auto", path, {})
    assert auto["dtype"] in ("bfloat16", "float32")
    assert apply_profile("auto", path, {"dtype": "float32"})["dtype"] == "float32"
    assert apply_profile("cpu-int4", path, {})["quantization"] == "int4"
    with pytest.raises(ValueError, match="no profile 'fastest'.*candidates: cpu-"):
        apply_profile("fastest", path, {})
    assert apply_profile("auto", "/no/such/model", {"seed": 1}) == {
        "seed": 1
    }  # loader's error later


def test_profiles_list_command(tmp_path: Path, tiny_model_dir):
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps({"cpu_flags": ["avx2"], "cores": 2, "memory_gb": 8}))
    out = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "profiles", "list", "--hardware", str(hw),
         "--model", str(tiny_model_dir("llama"))], capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        "* cpu-fp32" in out.stdout and "cpu-int4" in out.stdout and "no native bf16" in out.stdout
    )
