"""Quantized tiny models: weight-only against `transformers` running the dequantized weights,
activation-quantized methods close to the unquantized model, quantized checkpoints that load
again bit-identically without re-quantizing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.models.test_engine_vs_hf import PROMPTS, hf_greedy, hf_model
from tokenmill import LLM, SamplingParams
from tokenmill.cli import main
from tokenmill.layers.linear import Linear
from tokenmill.quant import quantize
from tokenmill.quant.checkpoint_writer import quantize_checkpoint
from tokenmill.quant.methods import QuantMethod
from tokenmill.quant.methods.weight_only import int4_group

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SCORE = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dequantized_hf(folder, method: str) -> transformers.PreTrainedModel:
    """`transformers` with every linear weight replaced by its quantize -> dequantize image."""
    model = hf_model(folder)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in LINEARS:
                group = {"group_size": int4_group(module.in_features)} if method == "int4" else {}
                module.weight.copy_(quantize(module.weight, method, **group).dequantize())
    return model


def prompt_logprobs(outputs) -> list[list[float]]:
    return [
        [lp[t] for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])] for o in outputs
    ]


def hf_prompt_logprobs(model, llm: LLM) -> list[list[float]]:
    out = []
    for prompt in PROMPTS:
        ids = llm.get_tokenizer().encode(prompt)
        logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        out.append([logits[i, t].item() for i, t in enumerate(ids[1:])])
    return out


@pytest.mark.parametrize("method", ["int8", "int4", "fp8_e4m3", "fp6_e2m3", "mxfp4", "nvfp4"])
def test_weight_only_model_equals_transformers_on_dequantized_weights(tiny_model_dir, method):
    folder = tiny_model_dir("llama")
    llm = LLM(folder, dtype="float32", quantization=method, kv_cache_memory=1 << 22)
    reference = dequantized_hf(folder, method)
    ours = prompt_logprobs(llm.generate(PROMPTS, SCORE, use_tqdm=False))
    for a, b in zip(ours, hf_prompt_logprobs(reference, llm)):
        torch.testing.assert_close(
            torch.tensor(a), torch.tensor(b, dtype=torch.float32), atol=1e-4, rtol=0
        )
    out = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for o in out:
        assert list(o.outputs[0].token_ids) == hf_greedy(reference, list(o.prompt_token_ids), 8)


@pytest.mark.parametrize("method", ["w8a8", "fp8"])
def test_activation_quantized_model_stays_close(tiny_model_dir, method):
    folder = tiny_model_dir("qwen2")  # with q/k/v bias
    base = LLM(folder, dtype="float32", kv_cache_memory=1 << 22)
    quant = LLM(folder, dtype="float32", quantization=method, kv_cache_memory=1 << 22)
    a = prompt_logprobs(base.generate(PROMPTS, SCORE, use_tqdm=False))
    b = prompt_logprobs(quant.generate(PROMPTS, SCORE, use_tqdm=False))
    diff = torch.tensor([x - y for ra, rb in zip(a, b) for x, y in zip(ra, rb)]).abs()
    # quantized (not a no-op) yet close; the exact arithmetic is checked per layer in tests/unit
    assert 0 < diff.mean() < 0.06 and diff.max() < 0.3
    assert quant.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("method", ["int4", "nvfp4", "w8a8", "fp8"])
def test_quantized_checkpoint_loads_without_requantizing(
    tiny_model_dir, tmp_path, method, monkeypatch
):
    folder = tiny_model_dir("llama")
    on_load = LLM(folder, dtype="float32", quantization=method, kv_cache_memory=1 << 22)
    expected = prompt_logprobs(on_load.generate(PROMPTS, SCORE, use_tqdm=False))
    qcfg = quantize_checkpoint(folder, tmp_path / "q", method, {})
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == qcfg and qcfg["method"] == method
    state = load_file(tmp_path / "q" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight_packed" in state
    assert "model.layers.0.self_attn.q_proj.weight" not in state
    assert (tmp_path / "q" / "tokenizer.json").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must not be quantized again")

    monkeypatch.setattr(QuantMethod, "quantize_weight", refuse)
    for cls in QuantMethod.__subclasses__():
        monkeypatch.setattr(cls, "quantize_weight", refuse)
    again = LLM(tmp_path / "q", dtype="float32", kv_cache_memory=1 << 22)
    assert again.engine.loaded.quantization == method
    loaded = prompt_logprobs(again.generate(PROMPTS, SCORE, use_tqdm=False))
    if again.engine.loaded.device.type == "cpu":
        assert loaded == expected  # the same weights, scales and arithmetic: bit-identical
    else:  # quantize-on-load calibrated on the GPU, the checkpoint on the CPU: ulp-level amax
        for a, b in zip(loaded, expected):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="quantized with"):
        LLM(tmp_path / "q", quantization="int8" if method != "int8" else "int4")


def test_w8a8_calibrates_smoothing_at_load(tiny_model_dir):
    folder = tiny_model_dir("llama")
    smooth = LLM(folder, dtype="float32", quantization="w8a8", kv_cache_memory=1 << 22)
    plain = LLM(
        folder, dtype="float32", quantization="w8a8", smoothquant_alpha=0.0, kv_cache_memory=1 << 22
    )
    layer = smooth.engine.loaded.model.model.layers[0].mlp.down_proj
    inv = layer.quant_method.smooth_inv
    assert inv.shape == (layer.in_features,) and (inv != 1).any()
    assert plain.engine.loaded.model.model.layers[0].mlp.down_proj.quant_method.smooth_inv is None


def test_w8a8_searches_alpha_per_layer_at_load(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    kw = dict(dtype="float32", quantization="w8a8", kv_cache_memory=1 << 22)
    searched = LLM(folder, smoothquant_search=True, **kw)
    methods = [
        m.quant_method
        for m in searched.engine.loaded.model.modules()
        if isinstance(m, Linear) and getattr(m.quant_method, "chosen_alpha", None) is not None
    ]
    assert len(methods) == 4 * 2  # qkv, o, gate_up, down in each of the 2 layers
    assert all(m.calibration is None for m in methods)  # samples and statistics freed once used
    assert {m.chosen_alpha for m in methods} != {0.5}
    plain = LLM(folder, **kw).engine.loaded.model.model.layers[0].mlp.down_proj
    assert plain.quant_method.chosen_alpha is None
    reference = LLM(folder, dtype="float32", kv_cache_memory=1 << 22)
    base = sum(prompt_logprobs(reference.generate(PROMPTS, SCORE, use_tqdm=False)), [])
    got = sum(prompt_logprobs(searched.generate(PROMPTS, SCORE, use_tqdm=False)), [])
    diff = torch.tensor(base) - torch.tensor(got)
    assert 0 < diff.abs().mean() < 0.06 and diff.abs().max() < 0.3  # as the fixed alpha's test
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(folder), "--method", "w8a8", "--out", str(out),
                 "--smoothquant-search"]) == 0  # fmt: skip
    again = sum(prompt_logprobs(LLM(out, **kw).generate(PROMPTS, SCORE, use_tqdm=False)), [])
    assert again == got  # the checkpoint holds the searched scales


def test_gptq_checkpoint_equals_gptq_on_load(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    on_load = LLM(folder, dtype="float32", quantization="nvfp4", gptq=True, kv_cache_memory=1 << 22)
    layer = on_load.engine.loaded.model.model.layers[0].self_attn.qkv_proj
    # the calibration statistics (Hessians) are gone once the layer is quantized
    assert layer.quant_method.calibration is None
    rtn = LLM(folder, dtype="float32", quantization="nvfp4", kv_cache_memory=1 << 22)
    expected = prompt_logprobs(on_load.generate(PROMPTS, SCORE, use_tqdm=False))
    assert expected != prompt_logprobs(rtn.generate(PROMPTS, SCORE, use_tqdm=False))
    quantize_checkpoint(folder, tmp_path / "q", "nvfp4", {"gptq": True})
    again = LLM(tmp_path / "q", dtype="float32", kv_cache_memory=1 << 22)
    assert prompt_logprobs(again.generate(PROMPTS, SCORE, use_tqdm=False)) == expected


@pytest.mark.parametrize("option", ["scale_search", "awq"])
def test_searched_checkpoint_equals_search_on_load(tiny_model_dir, tmp_path, option):
    """Block-scale search and AWQ scaling: the checkpoint holds what a load computes."""
    folder = tiny_model_dir("llama")
    kw = dict(dtype="float32", kv_cache_memory=1 << 22)
    searched = LLM(folder, quantization="nvfp4", **{option: True}, **kw)
    rtn = LLM(folder, quantization="nvfp4", **kw)

    def layer(llm):
        return llm.engine.loaded.model.model.layers[0].mlp.down_proj

    def scales(llm):
        return layer(llm).quant_method.qweight.scale.view(torch.uint8)

    assert not torch.equal(scales(searched), scales(rtn))  # the search moved some block scales
    if option == "awq":
        assert layer(searched).quant_method.input_smooth is not None
    expected = prompt_logprobs(searched.generate(PROMPTS, SCORE, use_tqdm=False))
    assert expected != prompt_logprobs(rtn.generate(PROMPTS, SCORE, use_tqdm=False))
    qcfg = quantize_checkpoint(folder, tmp_path / "q", "nvfp4", {option: True})
    assert qcfg[option] is True
    again = LLM(tmp_path / "q", **kw)
    assert torch.equal(scales(again), scales(searched))
    if option == "awq":
        assert torch.equal(
            layer(again).quant_method.input_smooth, layer(searched).quant_method.input_smooth
        )
    assert prompt_logprobs(again.generate(PROMPTS, SCORE, use_tqdm=False)) == expected


def test_eval_perplexity_cli_compares_with_the_unquantized_model(tiny_model_dir, tmp_path, capsys):
    from tokenmill.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    argv = ["eval", "perplexity", "--model", str(tiny_model_dir("llama")), "--dataset", str(text)]
    argv += ["--window", "64", "--max-windows", "3", "--json", "--dtype", "float32"]
    assert main([*argv, "--quantization", "nvfp4", "--scale-search", "--gptq"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantization"] == "nvfp4" and out["num_windows"] == 3
    assert out["perplexity"] != out["reference_perplexity"]  # a real comparison


def test_calibration_windows_sets_how_much_text_calibrates(tiny_model_dir, monkeypatch):
    import tokenmill.quant.calibrate as calibrate

    seen = []
    real = calibrate.input_stats

    def spy(model, windows, names):
        seen.append(len(windows))
        return real(model, windows, names)

    monkeypatch.setattr(calibrate, "input_stats", spy)
    kw = dict(dtype="float32", kv_cache_memory=1 << 22, max_model_len=64)
    LLM(tiny_model_dir("llama"), quantization="nvfp4", awq=True, **kw)
    LLM(tiny_model_dir("llama"), quantization="nvfp4", awq=True, calibration_windows=5, **kw)
    assert seen == [16, 5]
    with pytest.raises(ValueError, match="calibration_windows must be >= 1"):
        LLM(tiny_model_dir("llama"), quantization="nvfp4", awq=True, calibration_windows=0, **kw)
