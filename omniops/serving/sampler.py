"""Picks the next token of each sequence from its fp32 logits: greedy, or temperature with top-k / top-p /
min-p filtering. A request with a ``seed`` draws from its own generator, so its tokens do not depend on what
else shares the batch. Log-probabilities are the model's (before temperature and filters), as vLLM returns."""

from __future__ import annotations

import torch
from torch import Tensor

from omniops.serving.outputs import Logprob
from omniops.serving.request import Request


def _filter(logits: Tensor, top_k: int, top_p: float, min_p: float) -> Tensor:
    """One row [V] with the excluded tokens at -inf."""
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = torch.sort(logits, descending=True)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, probs: Tensor, req: Request) -> int:
        if req.params.seed is not None:
            if req.generator is None:
                req.generator = torch.Generator().manual_seed(req.params.seed)
            g = req.generator
        else:
            g = self.generator
        return int(torch.multinomial(probs, 1, generator=g))

    def __call__(self, logits: Tensor, reqs: list[Request]) -> tuple[list[int], list[dict[int, Logprob] | None]]:
        greedy = logits.argmax(-1).tolist()
        tokens: list[int] = []
        for i, r in enumerate(reqs):
            p = r.params
            if p.greedy:
                tokens.append(greedy[i])
                continue
            row = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
            tokens.append(self._draw(row.softmax(-1), r))
        lps: list[dict[int, Logprob] | None] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:
            logp = torch.log_softmax(logits[want], -1)
            for j, i in enumerate(want):
                n, tok = reqs[i].params.logprobs, tokens[i]
                row = logp[j]
                top = torch.topk(row, n) if n else None
                d: dict[int, Logprob] = {}
                if top is not None:
                    for rank, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1):
                        d[t] = Logprob(v, rank)
                if tok not in d:
                    d[tok] = Logprob(float(row[tok]), int((row > row[tok]).sum()) + 1)
                lps[i] = d
        return tokens, lps
