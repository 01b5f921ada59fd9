"""LoadRecorder: counts equal a bincount of topk_ids; window and EMA semantics; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omniops.placement import LoadRecorder


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layers=st.integers(1, 4), experts=st.integers(1, 16),
       tokens=st.integers(0, 40), k=st.integers(1, 4))
def test_counts_match_bincount(seed, layers, experts, tokens, k):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, experts, (layers, tokens, k), generator=g)
    rec, rec_all = LoadRecorder(layers, experts), LoadRecorder(layers, experts)
    for layer in range(layers):
        rec.record(layer, ids[layer].to(torch.int32))
    rec_all.record_all(ids)
    rec.step()
    rec_all.step()
    expected = torch.stack([torch.bincount(ids[layer].flatten(), minlength=experts) for layer in range(layers)])
    assert torch.equal(rec.weight(), expected.double())
    assert torch.equal(rec_all.weight(), expected.double())


def test_window_forgets_old_steps():
    rec = LoadRecorder(1, 3, mode="window", window=2)
    for e in (0, 1, 2):
        rec.record(0, torch.tensor([[e, e]]))
        rec.step()
    assert rec.weight().tolist() == [[0.0, 2.0, 2.0]]  # step with expert 0 fell out of the window


def test_ema():
    rec = LoadRecorder(1, 2, mode="ema", decay=0.5)
    rec.add_counts(torch.tensor([[4, 0]]))
    rec.step()
    assert rec.weight().tolist() == [[4.0, 0.0]]  # bias-corrected: one step's scale
    rec.add_counts(torch.tensor([[0, 4]]))
    rec.step()
    # ema = 0.5*(0.5*[4,0]) + 0.5*[0,4] = [1, 2]; correction 1 / (1 - 0.25)
    assert rec.weight().numpy() == pytest.approx(np.array([[4 / 3, 8 / 3]]))
    rec.reset()
    assert rec.weight().sum() == 0 and rec.steps == 0


def test_current_step_not_visible_until_step():
    rec = LoadRecorder(2, 4)
    rec.record(1, torch.tensor([3, 3, 1]))
    assert rec.weight().sum() == 0
    rec.step()
    assert rec.weight()[1].tolist() == [0.0, 1.0, 0.0, 2.0]


def test_bad_input():
    with pytest.raises(ValueError, match="mode"):
        LoadRecorder(2, 4, mode="avg")
    with pytest.raises(ValueError, match="decay"):
        LoadRecorder(2, 4, mode="ema", decay=1.0)
    with pytest.raises(ValueError, match="num_experts"):
        LoadRecorder(2, 0)
    rec = LoadRecorder(2, 4)
    with pytest.raises(ValueError, match="layer"):
        rec.record(2, torch.tensor([0]))
    with pytest.raises(ValueError, match="topk_ids"):
        rec.record(0, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="topk_ids"):
        rec.record_all(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="counts"):
        rec.add_counts(torch.ones(2, 3))
    with pytest.raises(ValueError, match="counts"):
        rec.add_counts(-torch.ones(2, 4))
