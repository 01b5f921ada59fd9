"""What every model runner shares: the batch's attention metadata, linears (plain or quantized), RoPE tables,
the paged-attention calls for GQA caches, and the MoE block on ``fused_moe``.

A step's tokens are one flat list (vLLM v1 style): first the decode tokens (one per sequence), then the
prefill chunks, each after its sequence's cached context. GQA runs them all through one ``gqa_prefill``; MLA
splits them (``mla_decode`` for the decodes, expanded K/V for the chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import omniops
from omniops import _calibrate


@dataclass
class AttentionMetadata:
    """The step's batch: sequences in flat order (decodes first), each with its new tokens after its cached
    context. The tensors alone drive GQA attention (what a compiled forward sees); the ints are host-side
    copies for the MLA paths that split decode from prefill."""

    positions: Tensor  # [T] int64
    slot_mapping: Tensor  # [T] int64: block * block_size + offset
    cu_seqlens: Tensor  # [B + 1] int32: sequence b owns new tokens cu[b]:cu[b+1]
    block_table: Tensor  # [B, max_blocks] int32
    context_lens: Tensor  # [B] int32: tokens already cached before this step's
    num_decode: int = 0  # the first num_decode sequences have one new token each
    prefill_context: list[int] = field(default_factory=list)  # context_lens of the others, as ints
    prefill_query: list[int] = field(default_factory=list)  # their new-token counts, as ints

    @property
    def any_context(self) -> bool:
        return any(self.prefill_context)

    @property
    def decode_block_table(self) -> Tensor:
        return self.block_table[:self.num_decode]

    @property
    def decode_seq_lens(self) -> Tensor:
        return self.context_lens[:self.num_decode] + 1

    @property
    def prefill_block_table(self) -> Tensor:
        return self.block_table[self.num_decode:]

    @property
    def prefill_cu_seqlens(self) -> Tensor:
        return self.cu_seqlens[self.num_decode:] - self.num_decode


ALL_ROWS = 1 << 30


def omni_linear_rows(dtype: torch.dtype) -> int:
    """Up to how many rows the omni GEMM (``grouped_gemm`` over one group: a weight-streaming kernel, AMX tiles
    packed once on the amx library) beats torch's linear for this dtype, by omniops' startup calibration on this
    CPU; 0 where it does not, or without a measurement. Decode-sized linears only stream their weight, and torch's
    CPU GEMM does that below the memory bandwidth (measured on an Intel Xeon with AMX, bf16, 1 thread: 10-13 GB/s
    against the omni kernel's 14-25 GB/s at 1-16 rows)."""
    rows = 0
    for r in _calibrate.ROWS:
        if not _calibrate.omni_linear_wins(dtype, r):
            return rows
        rows = r
    return ALL_ROWS  # faster at every measured size, prefill chunks included (e.g. 2 pool threads vs torch's 1)


def use_omni_gemm(omni_rows: int, rows) -> bool:
    """Whether a call with ``rows`` rows takes the omni GEMM. Inside a compiled graph there is no branch on the
    (symbolic) row count: it would guard, and the graphs would depend on the calibration; there the omni GEMM
    serves only where it won at every measured size."""
    if torch.compiler.is_compiling():
        return omni_rows >= _calibrate.ROWS[-1]
    return 0 < rows <= omni_rows


class Linear:
    """``y = x @ W.T``: the omni GEMM at decode-sized row counts where it is measured faster on this CPU, torch's
    GEMM (oneDNN / MKL) otherwise; or a QuantLinear with the project's formats."""

    def __init__(self, weight: Tensor, quantization: str | None = None, bias: Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias
        self.quant = None
        self.omni_rows = 0
        if quantization is not None:
            scheme = {"w8a8": "int8_channel", "fp8_block": "fp8_block", "w4a16": "int4_group"}[quantization]
            group = next((g for g in (128, 64, 32) if self.in_features % g == 0), None)
            if scheme == "int4_group" and group is None:
                raise ValueError(f"quantization: w4a16 needs in_features divisible by 32, got {self.in_features}")
            qw = omniops.quantize_weight(weight.float(), scheme, group_size=group or 128)
            self.quant = omniops.QuantLinear(qw, bias).to(weight.device)
            self.weight = None
        elif weight.device.type == "cpu" and weight.is_contiguous():
            self.omni_rows = omni_linear_rows(weight.dtype)
            # the one "expert" of the grouped GEMM, made once: a compiled graph that built W[None] itself would hand
            # the kernel a fresh copy per call, and the AMX tiles would be packed again every step
            self.weight3 = weight.unsqueeze(0)
            self._offsets: dict[int, Tensor] = {}

    def __call__(self, x: Tensor) -> Tensor:
        if self.quant is not None:
            return self.quant(x)
        if x.dim() == 2 and use_omni_gemm(self.omni_rows, x.shape[0]):
            if torch.compiler.is_compiling():  # no per-size cache in the graph
                offsets = torch.arange(2) * x.shape[0]
            else:
                offsets = self._offsets.get(x.shape[0])
                if offsets is None:
                    offsets = self._offsets[x.shape[0]] = torch.tensor([0, x.shape[0]])
            return self._omni(x, offsets)
        return F.linear(x, self.weight, self.bias)

    def _omni(self, x: Tensor, offsets: Tensor) -> Tensor:
        y = omniops.grouped_gemm(x, self.weight3, offsets)
        return y if self.bias is None else y + self.bias


class PerHead:
    """``y[b, h] = W[h] @ x[b, h]`` for ``W [H, N, K]`` (MLA's absorbed up-projections): one grouped GEMM with the
    heads as groups where the omni GEMM wins at decode sizes (as ``Linear``; measured 2x torch's bf16 bmm at 1-16
    rows, AMX, 1 thread), else torch's bmm."""

    def __init__(self, weight: Tensor):
        self.weight = weight.contiguous()  # [H, N, K]; bmm takes its [H, K, N] view
        self.omni_rows = omni_linear_rows(weight.dtype) if weight.device.type == "cpu" else 0

    def __call__(self, x: Tensor) -> Tensor:
        B, H, K = x.shape
        if not use_omni_gemm(self.omni_rows, B):
            return torch.bmm(x.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)
        rows = x.transpose(0, 1).reshape(H * B, K)  # grouped by head
        y = omniops.grouped_gemm(rows, self.weight, torch.arange(H + 1) * B)
        return y.view(H, B, -1).transpose(0, 1)


def rope_cache(config, head_dim: int, max_positions: int, dtype: torch.dtype) -> Tensor:
    """vLLM's ``cos_sin_cache [max_pos, rotary_dim]`` = cat(cos, sin), from transformers' RoPE parameter code
    (default, linear, dynamic-free yarn, llama3, ...): the same inv_freq and attention scaling as HF."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    # HF rounds cos/sin to the model dtype before rotating; do the same so bf16 runs match it
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), -1).to(dtype)


def paged_gqa(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
              scale: float) -> Tensor:
    """Attention of the step's tokens (q [T, Hq, D], k/v [T, Hkv, D]) after writing k/v into the paged cache:
    one varlen ``gqa_prefill`` over every sequence, a decode being a 1-token chunk after its context (as fast as
    ``gqa_decode`` at serving batch sizes, measured, and one graph node with no host-side branch).
    Returns [T, Hq, Dv]."""
    omniops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, validate=False)
    return omniops.gqa_prefill(q, k, v, meta.cu_seqlens, causal=True, scale=scale, k_cache=k_cache,
                               v_cache=v_cache, block_table=meta.block_table, context_lens=meta.context_lens,
                               validate=False)


class DenseMLP:
    """SwiGLU MLP: gate and up merged into one GEMM, then silu_and_mul and down."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, quantization: str | None):
        self.gate_up = Linear(torch.cat([gate, up]), quantization)
        self.down = Linear(down, quantization)

    def __call__(self, x: Tensor) -> Tensor:
        return self.down(omniops.silu_and_mul(self.gate_up(x)))


class FusedMoE:
    """Routed experts on one ``fused_moe`` call. ``route(x) -> (topk_weights, topk_ids)`` is the family's router.

    Shared experts (DeepSeek) ride along as extra experts that every token picks with weight 1: one kernel call
    instead of a separate MLP (a shared expert of n * I intermediate is n experts of I, SwiGLU being
    elementwise and the down projection a sum)."""

    def __init__(self, w13: Tensor, w2: Tensor, route: Callable[[Tensor], tuple[Tensor, Tensor]],
                 shared: tuple[Tensor, Tensor, Tensor] | None = None, quantization: str | None = None):
        self.num_routed = w13.shape[0]
        self.num_shared = 0
        if shared is not None:
            g, u, d = shared
            inter = w13.shape[1] // 2
            if g.shape[0] % inter:
                raise ValueError(f"shared experts: intermediate {g.shape[0]} is not a multiple of {inter}")
            n = g.shape[0] // inter
            sw13 = torch.cat([g.view(n, inter, -1), u.view(n, inter, -1)], dim=1)
            sw2 = d.view(d.shape[0], n, inter).transpose(0, 1)
            w13, w2 = torch.cat([w13, sw13]), torch.cat([w2, sw2])
            self.num_shared = n
        self.route = route
        self.quant = None
        if quantization is not None:  # per-expert quantized GEMMs between moe_dispatch and moe_combine
            self.quant = [(Linear(a, quantization), Linear(b, quantization)) for a, b in zip(w13, w2, strict=True)]
            w13 = w2 = None
        self.w13, self.w2 = (w13.contiguous(), w2.contiguous()) if w13 is not None else (None, None)
        if self.w13 is not None:
            from omniops.ops.prepack import moe_tiles

            moe_tiles(self.w13, self.w2)  # AMX tile layout packed now (bf16 on the amx library), not on request 1

    def __call__(self, x: Tensor) -> Tensor:
        w, ids = self.route(x)
        if self.num_shared:
            T = x.shape[0]
            sid = torch.arange(self.num_routed, self.num_routed + self.num_shared, dtype=ids.dtype)
            ids = torch.cat([ids, sid.expand(T, -1)], dim=1)
            w = torch.cat([w, w.new_ones(T, self.num_shared)], dim=1)
        w = w.float()  # fused_moe's fastest entry: fp32 weights, int32 ids
        if self.quant is None:
            return omniops.fused_moe(x, self.w13, self.w2, w, ids)
        return quantized_experts(x, ids, w, self.quant)


def quantized_experts(x: Tensor, ids: Tensor, weights: Tensor, experts: list) -> Tensor:
    """The MoE block on quantized experts ``experts[e] = (w13, w2)`` (``QuantLinear``): the rows ``x [T, H]``
    dispatched by ``ids [T, k]``, each expert's rows through ``w2(silu_and_mul(w13(rows)))``, combined with the
    fp32 ``weights [T, k]``. A helper (not an op); also the expert-parallel slots' path (``serving/ep``)."""
    d = omniops.moe_dispatch(x, ids, len(experts))
    y = torch.zeros_like(d.x_sorted)
    offs = d.expert_offsets.tolist()
    for e, (w13, w2) in enumerate(experts):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            y[lo:hi] = w2(omniops.silu_and_mul(w13(d.x_sorted[lo:hi])))
    return omniops.moe_combine(y, weights, d.inverse_index)


class DecoderModel:
    """A pre-norm decoder: ``layers`` (dicts with in_norm / post_norm / mlp) and ``_attention`` come from the
    family; the residual stream runs through fused add + RMSNorm."""

    embed: Tensor
    norm: Tensor
    lm_head: Linear
    eps: float
    layers: list[dict]
    num_layers: int
    dtype: torch.dtype

    def _attention(self, layer: dict, i: int, x: Tensor, meta: AttentionMetadata) -> Tensor:
        raise NotImplementedError

    def kv_bytes_per_block(self, block_size: int) -> int:
        raise NotImplementedError

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        raise NotImplementedError

    def forward(self, input_ids: Tensor, meta: AttentionMetadata) -> Tensor:
        h = self.embed[input_ids]
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual, x = h, omniops.rms_norm(h, layer["in_norm"], self.eps)
            else:
                x, residual = omniops.rms_norm(h, layer["in_norm"], self.eps, residual)
            h = self._attention(layer, i, x, meta)
            x, residual = omniops.rms_norm(h, layer["post_norm"], self.eps, residual)
            h = layer["mlp"](x)
        out, _ = omniops.rms_norm(h, self.norm, self.eps, residual)
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()
