"""One request's state inside the engine: its tokens, its KV blocks, how far the model has run it."""

from __future__ import annotations

import enum
import time

from omniops.serving.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV dropped; recomputed from its tokens when rescheduled
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None, eos_token_ids: tuple[int, ...] = (), arrival: float | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.status = Status.WAITING
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of all_token_ids, computed lazily
        self.num_registered_blocks = 0  # leading blocks of block_ids already offered to the prefix cache
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = -1  # prompt tokens served by the prefix cache at first scheduling
        self.num_preemptions = 0
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.generator = None  # torch.Generator of a seeded request, made by the sampler
        self.kv_transfer_params: dict | None = None  # vLLM's P/D hand-off params the request came with
        self.kv_transfer_out: dict | None = None  # what a prefill engine answers (where to pull the blocks)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop_token(self, max_model_len: int) -> bool:
        """After a new token: set finish_reason for EOS / stop ids / max_tokens / model length. True if done."""
        p, tok, n = self.params, self.output_token_ids[-1], len(self.output_token_ids)
        if n >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                self.finish_reason, self.stop_reason = "stop", None
                return True
            if tok in p.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", tok
                return True
        if (p.max_tokens is not None and n >= p.max_tokens) or self.num_tokens >= max_model_len:
            self.finish_reason = "length"
            return True
        return False
