"""Quantized weight formats (int8_channel, int4_group, fp8_block), quantize/dequantize helpers, QuantLinear."""

from omniops.quant.formats import (
    SCHEMES,
    Fp8BlockWeight,
    Int4GroupWeight,
    Int8ChannelWeight,
    dequantize_weight,
    pack_int4,
    quantize_activation_fp8_group,
    quantize_activation_per_token_int8,
    quantize_weight,
    unpack_int4,
)
from omniops.quant.linear import QuantLinear, quantize_model

__all__ = [
    "SCHEMES",
    "Fp8BlockWeight",
    "Int4GroupWeight",
    "Int8ChannelWeight",
    "QuantLinear",
    "dequantize_weight",
    "pack_int4",
    "quantize_activation_fp8_group",
    "quantize_activation_per_token_int8",
    "quantize_model",
    "quantize_weight",
    "unpack_int4",
]
