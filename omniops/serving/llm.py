"""The offline API in vLLM's shape: ``LLM(model_dir, ...).generate(prompts, SamplingParams)`` and ``.chat``."""

from __future__ import annotations

import itertools

from omniops.serving.config import EngineConfig
from omniops.serving.engine import LLMEngine
from omniops.serving.outputs import RequestOutput
from omniops.serving.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """``LLM(model, dtype="auto", max_model_len=None, kv_cache_memory=1.0, block_size=16, max_num_seqs=256,
    max_num_batched_tokens=2048, enable_prefix_caching=True, quantization=None, enforce_eager=False)``."""

    def __init__(self, model: str, **kwargs):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids); outputs in the prompts' order.

        Every prompt is checked before any is queued, so a bad one raises without leaving work behind."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        encoded = [self.engine.encode(p) if isinstance(p, str) else p for p in prompts]
        for ids in encoded:
            if not isinstance(ids, list):
                raise TypeError(f"prompt: expected a string or a list of token ids, got {type(ids).__name__}")
            self.engine.validate_prompt(ids)
        order = []
        for p, ids, sp in zip(prompts, encoded, params, strict=True):
            rid = f"llm-{next(self._ids)}"
            req = self.engine.add_request(rid, ids, sp)
            req.prompt = p if isinstance(p, str) else None
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(order):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"}) or a list of them, rendered with
        the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                   for c in convs]
        # the template already holds the special tokens: tokenize without adding BOS again
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(ids, sampling_params)
        for o, p in zip(outs, prompts, strict=True):
            o.prompt = p
        return outs
