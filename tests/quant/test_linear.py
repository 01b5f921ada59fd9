"""QuantLinear / quantize_model: a small MLP matches its dequantized float model, on every backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import omniops
from omniops.quant import QuantLinear, quantize_model
from omniops.quant.formats import (
    dequantize_activation_fp8_group,
    quantize_activation_fp8_group,
    quantize_activation_per_token_int8,
)
from omniops.testing import assert_close
from tests.ops._cases import BACKEND_CASES, Case, skip_unsupported


def _mlp(d: int = 256, h: int = 384) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, d, bias=False), nn.SiLU(), nn.Linear(d, 10))


def _fake_quant_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dequantized float model: each QuantLinear as x' @ W'.T + b in fp32, where W' is the dequantized weight
    and x' the activation after the same quantize->dequantize the kernels see (W4A16: x itself)."""
    for mod in model:
        if isinstance(mod, QuantLinear):
            if mod.scheme == "int8_channel":
                xq, xs = omniops.quantize_activation_per_token_int8(x)
                x = xq.float() * xs
            elif mod.scheme == "fp8_block":
                x = dequantize_activation_fp8_group(*omniops.quantize_activation_fp8_group(x))
            x = x.float() @ mod.dequantized_weight().t() + (0 if mod.bias is None else mod.bias.float())
        else:
            x = mod(x)
    return x


@pytest.mark.parametrize("scheme", ["int8_channel", "int4_group", "fp8_block"])
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_mlp_matches_dequantized_model(case: Case, scheme: str) -> None:
    skip_unsupported(case, torch.float32)
    model = quantize_model(_mlp(), scheme, skip=("4",), group_size=64).to(case.device)
    assert [type(m).__name__ for m in model] == ["QuantLinear", "SiLU", "QuantLinear", "SiLU", "Linear"]
    x = torch.randn(7, 256, device=case.device)
    expected = _fake_quant_forward(model, x)
    with case.active(), torch.no_grad():
        got = model(x)
    assert got.shape == (7, 10)
    # The next layer's activation quantization can round a value to the other side of a step when the
    # previous layer's fp32 sum differs in the last bit; 0.2% of the output scale covers one such flip.
    torch.testing.assert_close(got, expected, atol=2e-3 * expected.abs().max().item(), rtol=0)


def test_quantized_close_to_float_model() -> None:
    """Sanity of the whole path: the quantized MLP stays near the original float model."""
    model = _mlp()
    x = torch.randn(16, 256)
    with torch.no_grad():
        ref = model(x)
        for scheme, tol in [("int8_channel", 0.02), ("fp8_block", 0.05), ("int4_group", 0.15)]:
            q = quantize_model(_mlp(), scheme, skip=(), group_size=64)
            rel = (q(x) - ref).norm() / ref.norm()
            assert rel < tol, (scheme, rel.item())


def test_quant_linear_module() -> None:
    lin = nn.Linear(128, 33).to(torch.bfloat16)
    for scheme in ("int8_channel", "int4_group", "fp8_block"):
        q = QuantLinear.from_linear(lin, scheme, group_size=32, symmetric=False)
        assert q.in_features == 128 and q.out_features == 33 and scheme in repr(q)
        y = q(torch.randn(2, 3, 128, dtype=torch.bfloat16))
        assert y.shape == (2, 3, 33) and y.dtype == torch.bfloat16
        assert_close(q.dequantized_weight().to(torch.bfloat16), q.dequantized_weight().to(torch.bfloat16))
        sd = q.state_dict()
        q2 = QuantLinear(q.quantized_weight(), lin.bias)
        q2.load_state_dict(sd)
    with pytest.raises(TypeError, match="linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1), "int8_channel")


def test_quantize_model_skip_and_unsupported_shapes() -> None:
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8))  # 48 is no multiple of group 32? it is; use 64
    q = quantize_model(model, "int4_group", skip=lambda name, m: name == "1", group_size=64)
    assert isinstance(q[0], QuantLinear) and isinstance(q[1], nn.Linear)
    q = quantize_model(nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8)), "int4_group", group_size=64)
    assert isinstance(q[0], QuantLinear) and isinstance(q[1], nn.Linear)  # K=48 cannot hold groups of 64
    with pytest.raises(ValueError, match="scheme"):
        quantize_model(model, "int3")


@pytest.mark.parametrize("scheme", ["int8_channel", "fp8_block"])
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_quant_linear_eager_equals_two_step(case: Case, scheme: str) -> None:
    """QuantLinear's eager forward (one fused call) gives exactly the two-step result on every backend."""
    skip_unsupported(case, torch.float32)
    torch.manual_seed(0)
    lin = omniops.QuantLinear.from_linear(torch.nn.Linear(200, 70).to(case.device), scheme)
    x = torch.randn(2, 3, 200, device=case.device)
    with case.active():
        got = lin(x)
        if scheme == "int8_channel":
            two = omniops.w8a8_gemm(*quantize_activation_per_token_int8(x), lin.qweight, lin.scale, lin.bias,
                                    out_dtype=torch.float32)
        else:
            two = omniops.fp8_block_gemm(*quantize_activation_fp8_group(x), lin.qweight, lin.weight_scale_inv,
                                         lin.bias, out_dtype=torch.float32)
    assert torch.equal(got, two)
