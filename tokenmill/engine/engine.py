"""LLMEngine: the synchronous front over an in-process EngineCore (the offline `LLM` and tools).

`step()` runs one core step and turns its deltas into `RequestOutput`s: the same input and output
processors the server's front uses, the core called directly instead of over a pipe. Stop strings
found here abort the sequence in the core before the next step.
"""

from __future__ import annotations

import logging

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.input_processor import InputProcessor, PromptType
from tokenmill.engine.messages import EngineStats
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.executor.base import Executor
from tokenmill.executor.uniproc import UniprocExecutor
from tokenmill.models.build import LoadedModel
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["EngineStats", "LLMEngine", "PromptType"]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        executor: Executor | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """In-process by default; or over any executor (a worker in another process needs
        `tokenizer` given, since its model lives there)."""
        if executor is None:
            from tokenmill.executor import executor_for

            executor = executor_for(config, loaded)
            if not isinstance(executor, UniprocExecutor) and tokenizer is None:
                from tokenmill.models.loader import load_tokenizer

                tokenizer = load_tokenizer(config.model.model)
        self.executor = executor
        self.core = EngineCore(config, self.executor)
        self.config = config
        self.tokenizer = tokenizer or self.loaded.tokenizer
        self.max_model_len = self.core.max_model_len
        info = self.core.info
        self.inputs = InputProcessor(self.tokenizer, info.vocab_size, info.max_model_len)
        self.outputs = OutputProcessor(self.tokenizer)

    # In-process views for tools and tests; a multiprocess front has none of these.
    @property
    def loaded(self) -> LoadedModel:
        return self._uniproc().worker.loaded

    @property
    def runner(self):
        return self._uniproc().worker.runner

    def _uniproc(self) -> UniprocExecutor:
        if not isinstance(self.executor, UniprocExecutor):
            raise AttributeError("the model lives in another process with this executor")
        return self.executor

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def kv(self):
        return self.core.kv

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival: float | None = None,
    ) -> None:
        """Validate and queue a request; raises ValueError (naming the field) for bad input."""
        if request_id in self.outputs.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, request = self.inputs.process(request_id, prompt, params, arrival)
        self.outputs.add(request_id, text, request.prompt_token_ids, params, request.arrival_time)
        self.core.add_request(request)

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """End requests now, freeing their blocks; returns their final outputs."""
        self.core.abort(request_ids)
        finals = [self.outputs.abort(i) for i in request_ids]
        return [o for o in finals if o is not None]

    def step(self) -> list[RequestOutput]:
        result = self.core.step()
        outputs, to_abort = self.outputs.process(result.outputs)
        if to_abort:
            self.core.abort(to_abort)
        return outputs

    def has_unfinished(self) -> bool:
        return self.outputs.has_unfinished()

    def stats(self) -> EngineStats:
        return self.core.stats()
