"""The ``omni`` torch.compile backend (registered via the ``torch_dynamo_backends`` entry point).

``torch.compile(model, backend="omni")`` = Inductor plus ``OmniGraphPass`` as Inductor's
``post_grad_custom_pre_pass`` (patched in for this compile only, not globally). The pass rewrites the
post-grad graph onto omni custom ops; Inductor then compiles the rest as usual (it fuses what is left and
calls our ops as extern kernels).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from omniops.graph_passes.config import PassConfig, current
from omniops.graph_passes.report import PassReport, report
from torch._inductor.custom_graph_pass import CustomGraphPass

log = logging.getLogger("omniops.graph_passes")

_HERE = Path(__file__).resolve().parent

PassFn = Callable[[torch.fx.Graph, PassReport, PassConfig], None]


def pass_table() -> dict[str, PassFn]:
    """Every rewrite by its PassConfig switch, in the order they run. The MoE pass goes first (its experts matcher
    reads the routers it has just rewritten); residual add + RMSNorm before RMSNorm (the longer pattern first)."""
    from omniops.graph_passes import attention, linear, moe, quant, rotary
    from omniops.graph_passes.patterns import pattern_pass

    return {
        "moe": moe.moe_pass,
        "attention": attention.attention_pass,
        "linear": linear.linear_pass,
        "fused_add_rms_norm": pattern_pass("fused_add_rms_norm"),
        "rms_norm": pattern_pass("rms_norm"),
        "rotary": rotary.rotary_pass,
        "silu_and_mul": pattern_pass("silu_and_mul"),
        "silu_and_mul_split": pattern_pass("silu_and_mul_split"),
        "quant_linear": quant.quant_linear_pass,
    }


@torch.compiler.disable
def _sources_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(_HERE.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _count(graph: torch.fx.Graph, *targets: Any) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target in targets)


class OmniGraphPass(CustomGraphPass):
    """The omni rewrites of ``pass_table()`` that ``cfg`` switches on, in the table's order, then the report."""

    def __init__(self, cfg: PassConfig) -> None:
        self.cfg = cfg
        self.last = PassReport()

    def __call__(self, graph: torch.fx.Graph) -> None:
        from torch._inductor.fx_passes.post_grad import remove_noop_ops

        # Inductor runs this after our pre-pass; our patterns are traced without no-ops, so remove them first.
        remove_noop_ops(graph)
        rep = PassReport(graphs=1)
        for name, run in pass_table().items():
            if getattr(self.cfg, name):
                run(graph, rep, self.cfg)
        graph.eliminate_dead_code()
        for n in graph.nodes:
            if n.op == "call_function" and str(n.target).startswith("omni."):
                rep.ops[str(n.target).split(".")[1]] += 1
        _diagnose(graph, rep, self.cfg)
        self.last = rep
        report().merge(rep)
        if self.cfg.log:
            print(rep.format(), flush=True)

    def uuid(self) -> str:
        # Inductor's FX graph cache keys on this: our sources, the options, and the omniops version.
        import omniops

        cfg = ",".join(f"{f.name}={getattr(self.cfg, f.name)}" for f in fields(self.cfg))
        return f"omni-{omniops.__version__}-{_sources_hash()}-{cfg}"


def _diagnose(graph: torch.fx.Graph, rep: PassReport, cfg: PassConfig) -> None:
    """Record expected rewrites that did not happen, and why when we can tell."""
    aten = torch.ops.aten
    rsqrts = [n for n in graph.nodes if n.op == "call_function" and n.target is aten.rsqrt.default]
    if rsqrts:
        if not (cfg.rms_norm or cfg.fused_add_rms_norm):
            why = "switched off"
        elif any(_is_eps_input(n) for n in rsqrts):
            why = ("eps is a graph input, not a constant: dynamic=True turns float module attributes into "
                   "inputs; mark batch / sequence dynamic with torch._dynamo.mark_dynamic instead, or set "
                   "torch._dynamo.config.specialize_float = True")
        else:
            why = ("not the HF RMSNorm formulation (no eps, other casts, weight dtype differs from the "
                   f"input, ...), or fewer than min_rows={cfg.min_rows} rows (CPU: Inductor's loop is cheaper)")
        rep.miss("rms_norm", f"{len(rsqrts)} x 1/sqrt(mean(x^2)+eps) left: {why}")
    sdpa = [t for t in (getattr(aten, n, None) for n in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_attention_math",
        "_scaled_dot_product_cudnn_attention", "scaled_dot_product_attention")) if t is not None]
    n_sdpa = _count(graph, *(o.default for o in sdpa))
    if n_sdpa and not cfg.attention:
        rep.miss("attention", f"{n_sdpa} x SDPA left to Inductor: switched off")
    from omniops.graph_passes import moe, rotary
    from omniops.graph_passes.quant import separate_quantizations

    n_rot = rotary.rotate_half_left(graph) if not cfg.rotary else 0  # the rotary pass reports its own misses
    if n_rot:
        rep.miss("rotary", f"{n_rot} x rotate_half left: switched off")
    moe_left = _count(graph, *moe.grouped_mm_targets())
    if moe_left:
        rep.miss("fused_moe", f"{moe_left} x grouped_mm left: {moe.WHY_EXPERTS_LEFT if cfg.moe else 'switched off'}")

    n_q = separate_quantizations(graph)
    if n_q:
        why = ("switched off" if not cfg.quant_linear else "the activation quantization is not the "
               "quantize_activation_per_token_int8 / quantize_activation_fp8_group formula (other divisor, rounding "
               "or clamp), or the GEMM returns raw int32 accumulators")
        rep.miss("quant_linear", f"{n_q} x quantized GEMM left with a separate activation quantization: {why}")
    if any(n.op == "call_function" and n.target is aten.topk.default for n in graph.nodes) and cfg.moe:
        rep.miss("moe_route", "a top-k is left: only softmax top-k (+ renormalise) and DeepSeek-V3's grouped "
                              "sigmoid router (with its correction bias, weights from the unbiased scores) are "
                              "matched; for other routers use omniops.graph_passes.prepare(model)")


def _is_eps_input(rsqrt: torch.fx.Node) -> bool:
    add = rsqrt.args[0]
    if not (isinstance(add, torch.fx.Node) and add.target is torch.ops.aten.add.Tensor):
        return False
    eps = add.args[1]
    while isinstance(eps, torch.fx.Node) and eps.op == "call_function" and eps.args:
        eps = eps.args[0]
    return isinstance(eps, torch.fx.Node) and eps.op == "placeholder"


_HINTED = False


def _hint_prepare(gm: torch.fx.GraphModule) -> None:
    """Say once when a graph looks like an HF MoE model that prepare() would switch onto omni kernels."""
    global _HINTED
    if _HINTED:
        return
    names = " ".join(str(n.target) for n in gm.graph.nodes if n.op in ("placeholder", "get_attr", "call_function"))
    hf_experts = "grouped_mm" in names or ("experts" in names and "gate_up_proj" in names)
    if hf_experts and "omni.fused_moe" not in names:
        _HINTED = True
        log.warning("omni: this looks like a Hugging Face MoE model using its own experts implementation; "
                    "omniops.graph_passes.prepare(model) switches its experts, routers and attention to omni "
                    "kernels (the graph passes only rewrite what they can match)")


def omni_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                 mode: str | None = None, **kwargs: Any):
    """Dynamo backend: Inductor + the omni passes. ``options``: our PassConfig keys (see ``configure``); any
    other key is passed to Inductor as a config patch, as with ``backend="inductor"``."""
    from omniops.graph_passes.patterns import pattern_passes
    from torch._inductor.compile_fx import compile_fx

    import omniops  # noqa: F401  (registers the omni ops)

    options = dict(options or {})
    ours = {f.name for f in fields(PassConfig)}
    cfg = current({k: options.pop(k) for k in list(options) if k in ours})
    for k in options:
        if not hasattr(torch._inductor.config, k.split(".")[0]):
            raise ValueError(f"omni backend: unknown option {k!r}: neither an omni pass option {sorted(ours)} "
                             "nor an Inductor config")
    _hint_prepare(gm)
    pattern_passes(cfg.min_rows)  # register once per min_rows, here: outside Dynamo's fake mode
    patches: dict[str, Any] = {}
    if mode and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(options)
    patches["post_grad_custom_pre_pass"] = OmniGraphPass(cfg)
    if not cfg.cache:
        patches["fx_graph_cache"] = False
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)
    return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)
