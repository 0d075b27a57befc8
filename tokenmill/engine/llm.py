"""LLM: the offline, vLLM-compatible API. `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine, PromptType
from tokenmill.engine.outputs import RequestOutput, pooled_vector
from tokenmill.sampling_params import SamplingParams

Messages = list[dict[str, Any]]


class LLM:
    """Offline batch inference. Keyword arguments are EngineConfig fields (see `tokenmill serve --help`)."""

    def __init__(self, model: str = "default", config: EngineConfig | None = None, **kwargs: Any):
        """`LLM(model, **options)`, or `LLM(config=EngineConfig(...))` with every option set."""
        self.engine = LLMEngine(config or EngineConfig.from_kwargs(model=model, **kwargs))
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in input order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = sampling_params or SamplingParams()
        param_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(
                f"got {len(param_list)} sampling params for {len(prompts)} prompts; pass one or one each"
            )
        ids = []
        try:
            for prompt, p in zip(prompts, param_list):
                ids.append(self._next_id())
                self.engine.add_request(ids[-1], prompt, p)
        except Exception:
            self.engine.abort(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts: list[PromptType] = []
        for conv in conversations:
            text = tok.apply_chat_template(
                list(conv), add_generation_prompt, template_kwargs=chat_template_kwargs
            )
            prompts.append(
                {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
            )
        return self.generate(prompts, sampling_params, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling: str = "last",
        normalize: bool = True,
        use_tqdm: bool = True,
    ) -> list[list[float]]:
        """The prompt's final hidden states pooled ("last" token or "mean"), L2-normalized
        unless `normalize` is false: one vector (hidden_size floats) per prompt."""
        params = SamplingParams(max_tokens=1, temperature=0.0, pooling=pooling)
        outs = self.generate(prompts, params, use_tqdm)
        return [pooled_vector(o, normalize) for o in outs]

    def _next_id(self) -> str:
        self._counter += 1
        return f"offline-{self._counter}"

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(
            total=len(ids), desc="generating", unit="req", disable=not use_tqdm or len(ids) < 2
        )
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]
