"""The router pass (graph_passes/router.py; DeepSeek-V3's ``DeepseekV3TopkRouter`` grouped sigmoid form and the
softmax top-k -> ``omni::moe_route``) on small hand-written routers: matched counts, weights / ids equal to eager,
and near-misses that must stay as they are.

The router's top-k is unsorted (``sorted=False``) and moe_route sorts by score, so ids are compared as sorted
rows and the weights in that same order."""

from __future__ import annotations

import pytest
import torch

from omniops.testing import assert_close
from tests.graph_passes._util import compile_omni

pytestmark = pytest.mark.compile

E, H, T = 16, 32, 7


class GroupedSigmoidRouter(torch.nn.Module):
    """DeepSeek-V3's router as transformers 5.x writes it (DeepseekV3TopkRouter.forward)."""

    def __init__(self, n_group: int = 4, topk_group: int = 2, top_k: int = 4, norm: bool = True,
                 scaling: float = 2.5, bias: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(E, H, generator=g))
        self.register_buffer("bias", (torch.rand(E, generator=g) - 0.5) * 0.2 if bias else None)
        self.n_group, self.topk_group, self.top_k, self.norm, self.scaling = n_group, topk_group, top_k, norm, scaling

    def choice(self, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.bias

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x.float(), self.weight)
        scores = self.scores(logits)
        sfc = self.choice(scores)
        group_scores = sfc.view(-1, self.n_group, E // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, E // self.n_group).reshape(-1, E)
        sfc = sfc.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(sfc, k=self.top_k, dim=-1, sorted=False)[1]
        w = self.gathered(scores, sfc, ids)
        if self.norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scaling, ids

    def gathered(self, scores, sfc, ids):
        return scores.gather(1, ids)


class BiasedWeights(GroupedSigmoidRouter):
    """Near-miss: weights gathered from the biased, masked choice scores."""

    def gathered(self, scores, sfc, ids):
        return sfc.gather(1, ids)


class SoftmaxScores(GroupedSigmoidRouter):
    """Near-miss: softmax instead of sigmoid."""

    def scores(self, logits):
        return logits.softmax(-1)


class NoBias(GroupedSigmoidRouter):
    """Near-miss: no correction bias (moe_route would score a group by its best expert, not its top-2 sum)."""

    def choice(self, scores):
        return scores * 1.0


def _x() -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(1))


def _check_equal(out, ref) -> None:
    (w, ids), (rw, rids) = out, ref
    assert ids.dtype == rids.dtype == torch.int64
    s, p = ids.sort(-1)
    rs, rp = rids.sort(-1)
    assert torch.equal(s, rs)
    assert_close(w.gather(1, p), rw.gather(1, rp))


@pytest.mark.parametrize("cfg", [
    dict(n_group=4, topk_group=2, top_k=4, norm=True, scaling=2.5),  # DeepSeek-V3's form (scatter mask)
    dict(n_group=4, topk_group=1, top_k=3, norm=False, scaling=1.0),  # one group kept: Inductor's iota mask
    dict(n_group=1, topk_group=1, top_k=4, norm=True, scaling=1.5),  # no groups
], ids=["groups", "one_group_kept", "no_groups"])
def test_grouped_sigmoid_router_to_moe_route(cfg):
    m = GroupedSigmoidRouter(**cfg).eval()
    x = _x()
    _, out, rep = compile_omni(m, x, fullgraph=True)
    assert rep.matched["moe_route"] == 1 and rep.ops["moe_route"] == 1, rep
    assert "moe_route" not in rep.missed, rep  # no top-k left over
    with torch.no_grad():
        _check_equal(out, m(x))


def test_grouped_router_near_misses_left_alone():
    ms = [BiasedWeights().eval(), SoftmaxScores().eval(), NoBias().eval()]

    def f(x):
        return [m(x) for m in ms]

    x = _x()
    _, outs, rep = compile_omni(f, x, fullgraph=True)
    assert rep.matched["moe_route"] == 0 and "moe_route" not in rep.ops, rep  # (the router linears may be rewritten)
    assert "moe_route" in rep.missed  # the top-ks are left, and the report says so
    with torch.no_grad():
        for out, m in zip(outs, ms, strict=True):
            _check_equal(out, m(x))


def test_moe_near_miss_sigmoid_router_not_matched():
    # a sigmoid top-k is not a softmax router: left alone
    def f(logits):
        return torch.topk(torch.sigmoid(logits), 2, dim=-1)

    logits = torch.randn(5, 8)
    _, (v, i), rep = compile_omni(f, logits)
    assert rep.matched["moe_route"] == 0
    rv, ri = f(logits)
    assert torch.equal(i, ri)
    assert_close(v, rv)
