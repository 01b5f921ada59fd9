"""Paged-cache writes (omniops/ops/cache_ops.py: reshape_and_cache, mla_cache): every backend vs the reference, slot
-1 skipped, opcheck, and bad input through Python and straight into omniops._C."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniops
from omniops import _ext
from omniops.reference import attention as ref
from tests.ops._cases import BACKEND_CASES, DTYPES, Case, skip_unsupported
from tests.ops._paged import small_inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKEND_CASES)
@settings(max_examples=6)
@given(t=st.integers(0, 40), bs=st.sampled_from([16, 64]), h=st.sampled_from([1, 4]), d=st.sampled_from([8, 64]),
       pad=st.booleans())
def test_cache_writes_match_reference(case: Case, dtype, t, bs, h, d, pad) -> None:
    skip_unsupported(case, dtype)
    nb = 4
    slots = torch.randperm(nb * bs)[:t]
    if pad and t:
        slots[:: 3] = -1
    slots = slots.to(case.device)
    key = torch.randn(t, h, d, device=case.device).to(dtype)
    value = torch.randn(t, h, d + 8, device=case.device).to(dtype)
    kc = torch.randn(nb, bs, h, d, device=case.device).to(dtype)
    vc = torch.randn(nb, bs, h, d + 8, device=case.device).to(dtype)
    ekc, evc = kc.clone(), vc.clone()
    ref.reshape_and_cache(key, value, ekc, evc, slots)
    kv_c = torch.randn(t, 32, device=case.device).to(dtype)
    k_pe = torch.randn(t, 16, device=case.device).to(dtype)
    kv = torch.randn(nb, bs, 48, device=case.device).to(dtype)
    ekv = kv.clone()
    ref.mla_cache(kv_c, k_pe, ekv, slots)
    with case.active():
        omniops.reshape_and_cache(key, value, kc, vc, slots.int())
        omniops.mla_cache(kv_c, k_pe, kv, slots)
    assert torch.equal(kc, ekc) and torch.equal(vc, evc) and torch.equal(kv, ekv)


def test_opcheck() -> None:
    kc, vc, table, sl, kv, t2, s2 = small_inputs()
    kc, vc, kv = (torch.nan_to_num(x) for x in (kc, vc, kv))  # opcheck compares outputs with NaN-unsafe checks
    ops = torch.ops.omni
    kp, vp = torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    slots = torch.tensor([3, -1, 17, 40, 2, 9, 33])
    torch.library.opcheck(ops.reshape_and_cache.default, (kp, vp, kc.clone(), vc.clone(), slots, True))
    torch.library.opcheck(ops.mla_cache.default, (torch.randn(7, 32), torch.randn(7, 8), kv.clone(), slots, True))


def test_bad_input() -> None:
    kc, vc, table, sl, kv, t2, s2 = small_inputs()
    k, v = torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 999"):
        omniops.reshape_and_cache(k, v, kc, vc, torch.tensor([0, 999, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = -2"):
        omniops.mla_cache(torch.randn(7, 32), torch.randn(7, 8), kv, torch.tensor([-2, 1, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="k_pe: expected shape"):
        omniops.mla_cache(torch.randn(7, 32), torch.randn(6, 8), kv, torch.arange(7))
    with pytest.raises(ValueError, match="v_cache: expected dtype"):
        omniops.reshape_and_cache(k, v, kc, vc.half(), torch.arange(7))


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")
@pytest.mark.parametrize(
    ("name", "mutate", "match"),
    [
        ("reshape_and_cache", lambda a: a.update(slot_mapping=torch.tensor([0, 1, 2, 3, 4, 5, 9999])),
         r"slot_mapping\[6\] = 9999"),
        ("reshape_and_cache", lambda a: a.update(slot_mapping=torch.arange(7).int()),
         "slot_mapping: expected dtype int64"),
        ("mla_cache", lambda a: a.update(slot_mapping=torch.tensor([0, -5, 2, 3, 4, 5, 6])), r"slot_mapping\[1\]"),
        ("mla_cache", lambda a: a.update(kv_cache=a["kv_cache"].to("meta")), "kv_cache: expected a CPU tensor"),
    ],
)
def test_cpp_entry_point_rejects_bad_input(name, mutate, match) -> None:
    """omniops._C checks shapes, dtypes and every slot itself, before any kernel writes memory."""
    kc, vc, table, sl, kv, t2, s2 = small_inputs()
    k, v = torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    args = {
        "reshape_and_cache": dict(key=k, value=v, k_cache=kc, v_cache=vc, slot_mapping=torch.arange(7)),
        "mla_cache": dict(kv_c=torch.randn(7, 32), k_pe=torch.randn(7, 8), kv_cache=kv, slot_mapping=torch.arange(7)),
    }[name]
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(_ext.cpp(), name)(**args)
