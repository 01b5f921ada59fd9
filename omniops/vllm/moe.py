"""vLLM's unquantized fused-MoE method on omni ops: routing (``omni::moe_route``) and experts (``omni::fused_moe``).

vLLM 0.32 splits an MoE layer into a router (``CPURouter`` on CPU: softmax top-k, DeepSeek's grouped top-k with
the correction bias) and the quant method's experts, and lets a quant method take the router logits itself by
being *monolithic* (``is_monolithic`` -> the runner calls ``apply_monolithic(layer, x, router_logits)``).
Routers are not custom ops, so that is the door for the routing: with ``moe_route`` on, this method is
monolithic and routes with omni; with ``fused_moe`` on, it runs the experts with omni on the checkpoint's
``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` (gate rows first: vLLM's and omni's layout), which vLLM would otherwise
repack for its own kernel. Either part alone works: omni routing feeds vLLM's experts kernel, vLLM's router
feeds omni's experts. The runner runs the shared experts itself (``mk_can_overlap_shared_experts`` False).

A layer keeps vLLM's part when omni's cannot reproduce it: other activations, expert biases, tensor / expert /
data parallelism, LoRA, EPLB, custom routing functions (the reason is reported once per kind).
"""

from __future__ import annotations

import torch
from torch import Tensor
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

import omniops
from omniops.ops.prepack import tiles_active
from omniops.vllm import report
from omniops.vllm.threads import start_kernel_threads

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_OFF = "switched off by OMNI_VLLM_OPS"


def experts_why_not(moe) -> str | None:
    """Why omni's fused_moe cannot run the experts of a layer with FusedMoEConfig ``moe``, or None."""
    par = moe.moe_parallel_config
    if moe.activation != MoEActivation.SILU:
        return f"activation {moe.activation.value} (omni: silu)"
    if moe.has_bias:
        return "expert biases"
    if par.tp_size > 1 or par.ep_size > 1 or par.dp_size > 1 or par.pcp_size > 1 or par.use_ep:
        return "tensor/expert/data parallel MoE (omni's runs through omniops.distributed, not vLLM's groups)"
    if par.enable_eplb:
        return "EPLB"
    if moe.is_lora_enabled:
        return "LoRA"
    if moe.in_dtype not in _FLOATS:
        return f"activation dtype {moe.in_dtype}"
    if moe.has_hash_routing:
        return "hash routing"
    return None


def route_why_not(layer) -> str | None:
    """Why omni's moe_route cannot reproduce the routing of vLLM's CPURouter for ``layer``, or None."""
    if layer.custom_routing_function is not None:
        return "custom routing function"
    if layer.moe_config.moe_parallel_config.enable_eplb:
        return "EPLB (logical -> physical expert ids)"
    if layer.apply_router_weight_on_input:
        return "router weights applied on the input"
    if layer.use_grouped_topk:
        if layer.scoring_func not in ("softmax", "sigmoid"):
            return f"scoring {layer.scoring_func!r}"
        return None
    # ungrouped: vLLM's CPU router is plain softmax top-k, without bias or scaling
    if layer.scoring_func != "softmax":
        return f"ungrouped scoring {layer.scoring_func!r}"
    if layer.e_score_correction_bias is not None or layer.routed_scaling_factor != 1.0:
        return "ungrouped routing with a correction bias or a routed scaling factor"
    return None


class OmniUnquantizedFusedMoEMethod(UnquantizedFusedMoEMethod):
    """Registered (out of tree) as ``UnquantizedFusedMoEMethod``; ``route`` / ``experts`` are set per
    ``OMNI_VLLM_OPS`` at registration."""

    route: bool = True
    experts: bool = True

    def __init__(self, moe) -> None:
        super().__init__(moe)
        why = experts_why_not(moe) if self.experts else _OFF
        if why is None and self.unquantized_backend != UnquantizedMoeBackend.CPU:
            why = f"vLLM MoE backend {self.unquantized_backend.name}"
        self._experts_why = why
        self._route_why = _OFF if not self.route else "not decided yet"  # the layer's routing is known at load

    @property
    def _omni_experts(self) -> bool:
        return self._experts_why is None

    @property
    def _omni_route(self) -> bool:
        return self._route_why is None

    # vLLM's runner reads these inside the compiled forward: no super() (Dynamo cannot trace super() properties)
    @property
    def is_monolithic(self) -> bool:
        if self._omni_route:
            return True
        if self._omni_experts:
            return False  # omni experts on vLLM's routing: the modular path
        return UnquantizedFusedMoEMethod.is_monolithic.fget(self)

    @property
    def mk_can_overlap_shared_experts(self) -> bool:
        if self._omni_route or self._omni_experts:
            return False
        return UnquantizedFusedMoEMethod.mk_can_overlap_shared_experts.fget(self)

    def process_weights_after_loading(self, layer) -> None:
        if self.route:
            self._route_why = route_why_not(layer)
        if not self._omni_experts:
            super().process_weights_after_loading(layer)  # vLLM repacks and builds its kernel
        else:
            # keep the row-major weights; where the library takes tiles omni packs them once, now rather than
            # in the first step
            FusedMoEMethodBase.process_weights_after_loading(self, layer)
            w13, w2 = layer.w13_weight.data, layer.w2_weight.data
            if w13.dtype == torch.bfloat16 and tiles_active():
                omniops.prepack_moe_weights(w13, w2)
            start_kernel_threads()  # in the worker, after vLLM bound its threads
        if self.route:
            report.layer_built("moe_route", self._route_why)
        if self.experts:
            report.layer_built("fused_moe", self._experts_why)

    def _run_experts(self, layer, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        if self._omni_experts:
            return omniops.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)
        assert self.moe_kernel is not None
        return self.moe_kernel.apply(
            hidden_states=x, w1=layer.w13_weight, w2=layer.w2_weight, topk_weights=topk_weights,
            topk_ids=topk_ids, activation=layer.activation,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            global_num_experts=layer.global_num_experts, expert_map=layer.expert_map,
            shared_experts=None, shared_experts_input=None)

    def apply(self, layer, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, shared_experts,
              shared_experts_input: Tensor | None) -> Tensor:
        if not self._omni_experts:
            return super().apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        return self._run_experts(layer, x, topk_weights, topk_ids)

    def apply_monolithic(self, layer, x: Tensor, router_logits: Tensor,
                         input_ids: Tensor | None = None) -> Tensor:
        if not self._omni_route:
            return super().apply_monolithic(layer, x, router_logits, input_ids)
        grouped = layer.use_grouped_topk
        weights, ids = omniops.moe_route(
            router_logits, layer.top_k, scoring=layer.scoring_func, renormalize=layer.renormalize,
            num_groups=layer.num_expert_group if grouped else None, topk_groups=layer.topk_group if grouped else None,
            correction_bias=layer.e_score_correction_bias, routed_scaling=layer.routed_scaling_factor)
        return self._run_experts(layer, x, weights, ids)
