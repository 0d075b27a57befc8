"""A state-space model behind the same server: the official `openai` client gets completions
and streamed chat from a tiny Mamba-2, greedy text equal to the offline engine's."""

from __future__ import annotations

import openai

from tests.e2e.conftest import Server
from tests.models.test_mamba2 import make_mamba2
from tokenmill.config import EngineConfig
from tokenmill.engine.llm import LLM
from tokenmill.sampling_params import SamplingParams


def test_a_mamba2_model_serves_completions_and_streams(tiny_model_dir, tmp_path):
    model = str(make_mamba2(tmp_path / "mamba2", tiny_model_dir("llama")))
    offline = LLM(config=EngineConfig.from_kwargs(model=model, dtype="float32", max_model_len=256))
    expected = offline.generate(["one two three four"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0].text  # fmt: skip
    s = Server(model, "--max-model-len", "256")
    try:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused")
        r = client.completions.create(model="tiny", prompt="one two three four", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        assert r.choices[0].text == expected
        chunks = list(client.completions.create(model="tiny", prompt="one two three four", max_tokens=8,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    finally:
        assert s.stop() == 0
