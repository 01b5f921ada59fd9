"""Per-request generation settings, in vLLM's shape (``SamplingParams``), checked once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _number(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return float(v)


def _int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    return v


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature 0 is greedy. ``top_k`` 0 or -1 keeps all tokens; ``top_p`` in (0, 1]; ``min_p`` in [0, 1].
    ``seed`` makes a request's random choices reproducible whatever else is in the batch. ``stop`` strings are
    cut from the text (not included); ``stop_token_ids`` end the request like EOS but stay in ``token_ids``.
    ``logprobs`` N returns the top-N log-probabilities of each position plus the sampled token's.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if _int("n", self.n) != 1:
            raise ValueError(f"n: only n=1 is supported, got {self.n}")
        self.temperature = _number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        self.top_p = _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        self.min_p = _number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if _int("top_k", self.top_k) < -1:
            raise ValueError(f"top_k: must be -1, 0 (all tokens) or positive, got {self.top_k}")
        if self.seed is not None:
            _int("seed", self.seed)
        if self.max_tokens is not None and _int("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if _int("min_tokens", self.min_tokens) < 0:
            raise ValueError(f"min_tokens: must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= _int("logprobs", self.logprobs) <= 20:
            raise ValueError(f"logprobs: must be in [0, 20], got {self.logprobs}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: expected non-empty strings, got {s!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for t in self.stop_token_ids:
            if _int("stop_token_ids", t) < 0:
                raise ValueError(f"stop_token_ids: expected token ids >= 0, got {t}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
