"""OMNI_VLLM_OPS parsing and the vLLM version gate (no vLLM needed)."""

from __future__ import annotations

import pytest

from omniops.vllm.config import ENV, OPS, check_version, selected_ops


def test_default_and_all_select_every_op(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert selected_ops() == frozenset(OPS)
    assert selected_ops("") == selected_ops("ALL") == selected_ops(" all ") == frozenset(OPS)


def test_none_and_lists():
    assert selected_ops("none") == frozenset()
    assert selected_ops("rms_norm, fused_moe") == {"rms_norm", "fused_moe"}
    assert selected_ops("silu_and_mul,,attention") == {"silu_and_mul", "attention"}


@pytest.mark.parametrize("bad, word", [("rms_norm,rmsnorm", "rmsnorm"), ("fused_moe,none", "all/none"),
                                        ("all,attention", "all/none")])
def test_bad_selection_names_the_variable(bad, word):
    with pytest.raises(ValueError, match=ENV) as e:
        selected_ops(bad)
    assert word in str(e.value)


def test_version_gate():
    check_version("0.32.0")
    check_version("0.32.3")
    for v in ("0.31.9", "0.33.0", "1.0.0", "dev"):
        with pytest.raises(RuntimeError, match=f"vLLM {v} is not supported"):
            check_version(v)
    with pytest.raises(TypeError, match="version"):
        check_version(None)
