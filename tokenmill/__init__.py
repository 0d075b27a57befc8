"""tokenmill: an inference-optimized LLM microservice.

Public face: `LLM` (offline, vLLM-compatible), `SamplingParams`, `StructuredOutputsParams`,
`EngineConfig`.
"""

from tokenmill.config import EngineConfig
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch; import it only when asked, so pure modules stay light.
    if name == "LLM":
        from tokenmill.engine.llm import LLM

        return LLM
    raise AttributeError(name)
