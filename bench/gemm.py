"""omni-bench gemm: quantized GEMMs (W8A8 int8, W4A16 int4, FP8 block) against torch.mm and vLLM-CPU, in one run.

Shapes: ``quick`` M in {1, 16, 64}, (N, K) = (4096, 4096); ``full`` M in {1, 16, 64, 256, 1024} x (N, K) in
{(4096, 4096), (7168, 2048), (2048, 7168)}. Per scheme one table row group ("op") with:
  eager            torch.mm fp32 (x @ W.T, the float weight)
  torch.mm bf16    torch.mm in bf16
  omni[b]          our GEMM from pre-quantized activations (W4A16: bf16 x; "fp32 x": float32 x)
  omni[b]+quant    W8A8 / FP8: per-token activation quantization + GEMM, from the float x (two calls: what
                   QuantLinear runs eagerly)
  omni[b] fused    W8A8 / FP8: the same from the float x in one call (w8a8_linear / fp8_block_linear: what the
                   quant_linear graph pass turns the two calls into)
  vllm             vLLM-CPU: W8A8 dynamic_scaled_int8_quant + onednn_scaled_mm (oneDNN, from float x);
                   W4A16 cpu_gemm_wna16 (bf16 x, GPTQ-style blocked int4)
GB/s = the scheme's weight bytes read / time; TFLOP/s = 2*M*N*K / time (TOP/s for int8).
On a GPU: the same with the triton backend, peers torch.mm bf16, torch._int_mm and torch._scaled_mm (row-wise).
"""

from __future__ import annotations

import torch
from omniops.bench._ops import with_backend
from omniops.bench.common import BenchOptions
from omniops.bench.peers import vllm_op
from omniops.bench.report import Case, run_routine
from rich.console import Console

import omniops
from omniops.quant.formats import (
    quantize_activation_fp8_group,
    quantize_activation_per_token_int8,
    quantize_weight,
)

NAME = "gemm"
QUICK = {"m": [1, 16, 64], "nk": [(4096, 4096)]}
FULL = {"m": [1, 16, 64, 256, 1024], "nk": [(4096, 4096), (7168, 2048), (2048, 7168)]}
GPU = {"m": [16, 4096], "nk": [(7168, 7168)]}


def _backends(opts: BenchOptions, device: str) -> list[str]:
    """Ours to time: as requested, else cpu (CPU) / triton (GPU). The reference (int64 / fp32 dequantized
    matmuls) and the Triton interpreter are far too slow for these sizes unless asked for."""
    if opts.backends:
        return list(opts.backends)
    if device == "cuda":
        return ["triton"]
    return ["cpu"] if "cpu" in omniops.available_backends("cpu") else ["reference"]


def _vllm_w8a8(w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype):
    """vLLM-CPU's oneDNN int8 linear (as its CPU ScaledMM kernel): returns fn(x) or None when absent."""
    create, quant, mm = (vllm_op(n) for n in ("create_onednn_scaled_mm_handler", "dynamic_scaled_int8_quant",
                                              "onednn_scaled_mm"))
    if create is None or quant is None or mm is None:
        return None
    handler = torch.tensor(create(w_q.t(), w_scale.reshape(-1, 1), out_dtype, True, False, 32), dtype=torch.int64)

    def run(x: torch.Tensor) -> torch.Tensor:
        x_q = torch.empty_like(x, dtype=torch.int8)
        x_s = torch.empty(x.shape[0], 1, dtype=torch.float32)
        quant(x_q, x, x_s, None)
        out = torch.empty(x.shape[0], w_q.shape[0], dtype=out_dtype)
        mm(out, x_q, x_s, None, None, None, handler)
        return out

    return run


def _vllm_wna16(n: int, k: int, group: int, dtype: torch.dtype):
    """vLLM-CPU's cpu_gemm_wna16 on a random int4 weight in its blocked layout ([N/16, 2K] int32, 16 output
    channels per block, 8 int4 per int32) with [K/group, N] scales: returns fn(x) or None when absent."""
    op = vllm_op("cpu_gemm_wna16")
    if op is None:
        return None
    q = torch.randint(-(2**31), 2**31 - 1, (n // 16, 2 * k), dtype=torch.int32)
    scales = (torch.rand(k // group, n) * 0.01).to(dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], n, dtype=dtype)
        op(x, q, out, scales, None, None, 8, "vec")
        return out

    return run


def cases(opts: BenchOptions) -> list[Case]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = GPU if device == "cuda" else (FULL if opts.shapes == "full" else QUICK)
    backends = _backends(opts, device)
    out: list[Case] = []
    for n, k in preset["nk"]:
        out += _cases_nk(n, k, preset["m"], backends, device)
    return out


def _quantized_linear_impls(c: Case, backends: list[str], gemm, linear, quantize, x_q, x_s, xb, w_q, w_scale) -> None:
    """omni's three roads to a quantized linear: the GEMM on x quantized beforehand, quantize + GEMM timed together,
    and the fused linear (quantization inside the call)."""
    bf16 = torch.bfloat16
    for b in backends:
        c.impls[f"omni[{b}]"] = with_backend(b, lambda: gemm(x_q, x_s, w_q, w_scale, out_dtype=bf16))
        c.impls[f"omni[{b}]+quant"] = with_backend(b, lambda: gemm(*quantize(xb), w_q, w_scale, out_dtype=bf16))
        c.impls[f"omni[{b}] fused"] = with_backend(b, lambda: linear(xb, w_q, w_scale, out_dtype=bf16))


def _cases_nk(n: int, k: int, ms: list[int], backends: list[str], device: str) -> list[Case]:
    out: list[Case] = []
    w = torch.randn(n, k, device=device) * 0.02
    wb = w.to(torch.bfloat16)
    q8 = quantize_weight(w, "int8_channel")
    q4 = quantize_weight(w, "int4_group", group_size=128)
    qf = quantize_weight(w, "fp8_block")
    v8 = _vllm_w8a8(q8.qweight, q8.scale, torch.bfloat16) if device == "cpu" else None
    v4 = _vllm_wna16(n, k, 128, torch.bfloat16) if device == "cpu" else None
    for m in ms:
        x = torch.randn(m, k, device=device)
        xb = x.to(torch.bfloat16)
        x_q, x_s = quantize_activation_per_token_int8(x)
        xf_q, xf_s = quantize_activation_fp8_group(x)
        flops = 2.0 * m * n * k
        shape = f"M={m} N={n} K={k}"

        def peers(c: Case, x=x, xb=xb) -> None:
            c.impls["eager"] = lambda: x @ w.t()
            c.impls["torch.mm bf16"] = lambda: xb @ wb.t()

        c = Case("w8a8", shape, "int8", n * k + 4 * n, flops=flops, device=device)
        peers(c)
        if v8 is not None:
            c.impls["vllm"] = lambda v8=v8, xb=xb: v8(xb)
        if device == "cuda":
            c.impls["torch._int_mm"] = lambda x_q=x_q: torch._int_mm(x_q, q8.qweight.t())
        _quantized_linear_impls(c, backends, omniops.w8a8_gemm, omniops.w8a8_linear,
                                quantize_activation_per_token_int8, x_q, x_s, xb, q8.qweight, q8.scale)
        out.append(c)

        c = Case("w4a16 g128", shape, "int4", n * k // 2 + 4 * n * k // 128, flops=flops, device=device)
        peers(c)
        if v4 is not None:
            c.impls["vllm"] = lambda v4=v4, xb=xb: v4(xb)
        for b in backends:
            c.impls[f"omni[{b}]"] = with_backend(
                b, lambda xb=xb: omniops.w4a16_gemm(xb, q4.packed, q4.scales, None, 128))
            c.impls[f"omni[{b}] fp32 x"] = with_backend(
                b, lambda x=x: omniops.w4a16_gemm(x, q4.packed, q4.scales, None, 128))
        out.append(c)

        c = Case("fp8_block", shape, "fp8", n * k + 4 * qf.scale.numel(), flops=flops, device=device)
        peers(c)
        if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
            xr, wr = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            ones_m, ones_n = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
            c.impls["torch._scaled_mm rowwise"] = lambda xr=xr, wr=wr, a=ones_m, b=ones_n: torch._scaled_mm(
                xr, wr.t(), scale_a=a, scale_b=b, out_dtype=torch.bfloat16)
        _quantized_linear_impls(c, backends, omniops.fp8_block_gemm, omniops.fp8_block_linear,
                                quantize_activation_fp8_group, xf_q, xf_s, xb, qf.qweight, qf.scale)
        out.append(c)
    return out


def run(opts: BenchOptions, console: Console) -> list[dict]:
    return run_routine(NAME, "quantized GEMM (GB/s = weight bytes read; TFLOP/s = TOP/s for int8)", cases(opts),
                       opts, console, "quantized GEMM: weight-read GB/s")
