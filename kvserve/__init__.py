"""kvserve: an LLM serving engine that never computes the same key/value state twice.

Paged KV cache with automatic prefix caching, continuous batching with chunked prefill and preemption, and
our own PyTorch forward pass for the Llama family.
"""

from kvserve.config import EngineConfig
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; import it lazily so `import kvserve` stays cheap for the scheduler and tools.
    if name == "LLM":
        from kvserve.llm import LLM

        return LLM
    if name == "LLMEngine":
        from kvserve.engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
