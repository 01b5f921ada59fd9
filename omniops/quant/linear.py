"""``QuantLinear``: an nn.Linear replacement that stores a quantized weight and runs the quantized GEMMs, and
``quantize_model`` that swaps a model's nn.Linear layers for it.

Activation quantization (W8A8: per token int8; FP8: per token per 128 of K) + GEMM: in eager mode one fused call
(``w8a8_linear`` / ``fp8_block_linear``); under torch.compile the two steps (``quantize_activation_*`` in torch
ops, then ``w8a8_gemm`` / ``fp8_block_gemm``), which the omni backend's ``quant_linear`` pass turns back into the
fused call (and which plain Inductor compiles as a fused quantization loop + the GEMM). Both give identical
results on a given backend.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

import omniops  # the public ops, looked up at call time: omniops.ops imports the formats of this package
from omniops.quant.formats import (
    SCHEMES,
    Fp8BlockWeight,
    Int4GroupWeight,
    Int8ChannelWeight,
    QuantizedWeight,
    dequantize_weight,
    quantize_activation_fp8_group,
    quantize_activation_per_token_int8,
    quantize_weight,
)


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with W stored as ``scheme`` (see ``omniops.quant.formats``).

    Output dtype = input dtype. Buffers: int8_channel ``qweight``, ``scale``; int4_group ``packed``, ``scales``,
    ``zeros`` (asymmetric only); fp8_block ``qweight``, ``weight_scale_inv`` (DeepSeek-V3's name); ``bias``.
    """

    def __init__(self, qw: QuantizedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.scheme = qw.scheme
        self.out_features, self.in_features = qw.shape
        if isinstance(qw, Int8ChannelWeight):
            self.register_buffer("qweight", qw.qweight)
            self.register_buffer("scale", qw.scale)
        elif isinstance(qw, Int4GroupWeight):
            self.group_size = qw.group_size
            self.register_buffer("packed", qw.packed)
            self.register_buffer("scales", qw.scales)
            self.register_buffer("zeros", qw.zeros)
        elif isinstance(qw, Fp8BlockWeight):
            self.register_buffer("qweight", qw.qweight)
            self.register_buffer("weight_scale_inv", qw.scale)
        else:
            raise TypeError(f"qw: expected a quantized weight dataclass, got {type(qw).__name__}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, *, group_size: int = 128,
                    symmetric: bool = True) -> QuantLinear:
        """Quantize ``linear``'s weight to ``scheme`` (int8_channel, int4_group, fp8_block)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), scheme, group_size=group_size, symmetric=symmetric)
        return cls(qw, linear.bias)

    def quantized_weight(self) -> QuantizedWeight:
        if self.scheme == "int8_channel":
            return Int8ChannelWeight(self.qweight, self.scale)
        if self.scheme == "int4_group":
            return Int4GroupWeight(self.packed, self.scales, self.zeros, self.group_size)
        return Fp8BlockWeight(self.qweight, self.weight_scale_inv)

    def dequantized_weight(self) -> Tensor:
        """float32 [out_features, in_features]."""
        return dequantize_weight(self.quantized_weight())

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # Traced: the two steps, so the graph shows the quantization (the quant_linear pass fuses it, or Inductor
        # compiles it); eager: one call, no Python between quantization and GEMM.
        fused = not torch.compiler.is_compiling()
        if self.scheme == "int8_channel":
            if fused:
                return omniops.w8a8_linear(x, self.qweight, self.scale, bias, out_dtype=x.dtype)
            x_q, x_scale = quantize_activation_per_token_int8(x)
            return omniops.w8a8_gemm(x_q, x_scale, self.qweight, self.scale, bias, out_dtype=x.dtype)
        if self.scheme == "int4_group":
            return omniops.w4a16_gemm(x, self.packed, self.scales, self.zeros, self.group_size, bias)
        if fused:
            return omniops.fp8_block_linear(x, self.qweight, self.weight_scale_inv, bias, out_dtype=x.dtype)
        x_q, x_scale = quantize_activation_fp8_group(x)
        return omniops.fp8_block_gemm(x_q, x_scale, self.qweight, self.weight_scale_inv, bias, out_dtype=x.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}, symmetric={self.zeros is None}" if self.scheme == "int4_group" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{g}"


Skip = Iterable[str] | Callable[[str, nn.Linear], bool] | None


def _skipped(name: str, mod: nn.Linear, skip: Skip) -> bool:
    if skip is None:
        return False
    if callable(skip):
        return bool(skip(name, mod))
    return any(fnmatch.fnmatchcase(name, pat) for pat in skip)


def quantize_model(model: nn.Module, scheme: str, skip: Skip = ("lm_head", "*.lm_head"), *, group_size: int = 128,
                   symmetric: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a ``QuantLinear`` of ``scheme``; returns model.

    ``skip``: qualified module names or fnmatch patterns to keep in float (default: the LM head), or a
    predicate ``(name, linear) -> bool``. Layers whose shape the scheme cannot hold (int4: K not a multiple of
    ``group_size``) stay in float too.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not _skipped(name, mod, skip)]
    for name, mod in targets:
        if scheme == "int4_group" and mod.in_features % group_size:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = QuantLinear.from_linear(mod, scheme, group_size=group_size, symmetric=symmetric)
        setattr(parent, child, q.to(mod.weight.device))
    return model


__all__ = ["QuantLinear", "quantize_model"]
