"""Serving: a continuous-batching engine on omni ops, the offline ``LLM`` API, and (``omni-serve``) an
OpenAI-compatible HTTP server."""

from omniops.serving.config import EngineConfig
from omniops.serving.engine import LLMEngine
from omniops.serving.llm import LLM
from omniops.serving.outputs import CompletionOutput, Logprob, RequestOutput
from omniops.serving.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "Logprob", "RequestOutput", "SamplingParams"]
