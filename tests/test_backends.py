"""Backend selection, errors that name op/backend/reason, cpu_info and ISA switching."""

from __future__ import annotations

import pytest
import torch

import omniops
from omniops import _backends, _cpu, _ext
from omniops.ops.norm import RMS_NORM

needs_cpp = pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C not built")


def test_default_backend_per_device() -> None:
    x = torch.randn(2, 8)
    expected = "cpu" if _ext.cpp() is not None else "reference"
    assert RMS_NORM.backend_for(x.device, x.dtype) == expected


def test_use_backend_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 8)
    with omniops.use_backend("reference"):
        assert RMS_NORM.backend_for(x.device, x.dtype) == "reference"
    monkeypatch.setenv("OMNI_BACKEND", "reference")
    assert RMS_NORM.backend_for(x.device, x.dtype) == "reference"
    monkeypatch.setenv("OMNI_BACKEND", "nope")
    with pytest.raises(ValueError, match="OMNI_BACKEND"):
        RMS_NORM.backend_for(x.device, x.dtype)
    with pytest.raises(ValueError, match="backend: expected one of"):
        with omniops.use_backend("cuda"):
            pass


def test_unservable_request_names_op_backend_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(2, 8), torch.randn(8)
    with omniops.use_backend("triton"):
        with pytest.raises(omniops.BackendError, match=r"omni::rms_norm: backend 'triton' cannot run this call: .*"):
            omniops.rms_norm(x, w)
    with omniops.use_backend("triton", fallback=True):
        torch.testing.assert_close(omniops.rms_norm(x, w), omniops.rms_norm(x, w))


def test_cpu_backend_rejects_other_dtypes_clearly() -> None:
    reason = _backends.generic_reason("cpu", torch.device("cpu"), torch.float64)
    assert reason is not None and ("float64" in reason or "_C" in reason)


@needs_cpp
def test_cpu_info_and_forced_isa() -> None:
    info = omniops.cpu_info()
    assert info["isa"] in info["available_isas"]
    assert info["features"]["avx2"] == ("avx2" in info["available_isas"])
    for isa in _cpu.available_isas():
        with _cpu.force_isa(isa):
            assert _ext.cpp().get_isa() == isa
    assert _ext.cpp().get_isa() == info["isa"]
    with pytest.raises(ValueError, match="isa"):
        _ext.cpp().set_isa("sse9")


@needs_cpp
def test_unrunnable_isa_is_refused() -> None:
    """The AVX-512 library must be refused (not crash) on a CPU without AVX-512."""
    info = omniops.cpu_info()
    if "avx512" in info["available_isas"]:
        pytest.skip("this CPU runs the AVX-512 library")
    with pytest.raises(ValueError, match="cannot run on this CPU"):
        _ext.cpp().set_isa("avx512")


def test_ops_have_no_autograd_and_say_so() -> None:
    """Inference ops: through the public function a forward on inputs that require grad runs and its backward
    raises (custom_op's behaviour without register_autograd); the raw dispatcher op refuses such inputs."""
    x, w = torch.randn(4, 8, requires_grad=True), torch.ones(8)
    y = omniops.rms_norm(x, w)
    with torch.no_grad():
        assert torch.equal(y, omniops.rms_norm(x, w))
    with pytest.raises(RuntimeError, match="without an autograd formula"):
        y.sum().backward()
    with pytest.raises(RuntimeError, match="without an autograd formula"):
        torch.ops.omni.rms_norm.default(x, w, 1e-6)
