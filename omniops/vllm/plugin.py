"""``register()``: the ``vllm.general_plugins`` entry point.

vLLM calls it in every process it starts (API server, engine core, workers), before any model is built, and
a process may call it more than once. It checks the vLLM version and platform, then registers the parts
``OMNI_VLLM_OPS`` asks for: out-of-tree custom ops (``CustomOp.register_oot``), the MoE quant method, and
attention backends (``register_backend`` overrides the class path of the CPU platform's backend enum members:
the CPU platform picks CPU_ATTN / CPU_MLA / AMX_MLA itself and ignores other ``--attention-backend`` values).
"""

from __future__ import annotations

import importlib.util
import logging
import os

from omniops.vllm import config, report

log = logging.getLogger("vllm.omniops")
_done = False

_OOT_LAYERS = (  # OMNI_VLLM_OPS name, vLLM class name, omniops.vllm.layers class
    ("rms_norm", "RMSNorm", "OmniRMSNorm"),
    ("silu_and_mul", "SiluAndMul", "OmniSiluAndMul"),
    ("rotary_embedding", "RotaryEmbedding", "OmniRotaryEmbedding"),
)


def register() -> None:
    """Replace the vLLM ops ``OMNI_VLLM_OPS`` selects (default: all) with omni ops. Idempotent per process.

    Raises ValueError for a bad ``OMNI_VLLM_OPS`` and RuntimeError for an unsupported vLLM version."""
    global _done
    if _done:
        return
    ops = config.selected_ops()
    _done = True
    if not ops:
        for name in config.OPS:
            report.left(name, f"{config.ENV}=none")
        log.info(report.line())
        return
    import vllm
    from vllm.platforms import current_platform

    config.check_version(vllm.__version__)
    if not current_platform.is_cpu():
        for name in config.OPS:
            report.left(name, f"platform {current_platform.device_name!r}: the plugin targets vLLM's CPU platform")
        log.warning(report.line())
        return
    for name in config.OPS:
        if name not in ops:
            report.left(name, f"not in {config.ENV}")
    if importlib.util.find_spec("omniops._C") is None or os.environ.get("OMNI_USE_CPP") == "0":
        log.warning("omniops vLLM plugin: omniops._C is not available (built with OMNI_USE_CPP=0, or not built): "
                    "the omni ops run their pure-torch reference implementations, far slower than vLLM's kernels")
    _register_layers(ops)
    _register_moe(ops)
    _register_attention(ops)
    _key_compile_cache(ops)
    log.debug(report.line())


def _key_compile_cache(ops: frozenset[str]) -> None:
    """Make vLLM's torch.compile cache key depend on what the plugin replaced.

    vLLM keys its AOT compile cache on its config and on the environment variables it knows
    (``vllm.envs.environment_variables``), not on out-of-tree registrations: without this a run with the plugin
    could load the graph a run without it compiled (or with other ``OMNI_VLLM_OPS``), and the other way round.
    Adding a factor to that table is the one hook 0.32 offers; the traced sources (ours included) are checked
    by vLLM on load anyway."""
    import vllm.envs as envs

    import omniops

    key = f"omniops {omniops.__version__}: " + ",".join(sorted(ops))
    envs.environment_variables["OMNI_VLLM_COMPILE_KEY"] = lambda: key


def _register_layers(ops: frozenset[str]) -> None:
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot

    from omniops.vllm import layers

    for name, vllm_name, cls_name in _OOT_LAYERS:
        if name not in ops:
            continue
        if vllm_name not in op_registry_oot:  # another plugin (or a reload) may hold the slot
            CustomOp.register_oot(getattr(layers, cls_name), name=vllm_name)
        if op_registry_oot[vllm_name] is getattr(layers, cls_name):
            report.replaced(name, f"{vllm_name} -> {config.OPS[name][1]}")
        else:
            report.left(name, f"{vllm_name} is already replaced by {op_registry_oot[vllm_name].__qualname__}")


def _register_moe(ops: frozenset[str]) -> None:
    route, experts = "moe_route" in ops, "fused_moe" in ops
    if not (route or experts):
        return
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot

    from omniops.vllm.moe import OmniUnquantizedFusedMoEMethod

    slot = "UnquantizedFusedMoEMethod"
    holder = op_registry_oot.get(slot)
    if holder is None:
        OmniUnquantizedFusedMoEMethod.route, OmniUnquantizedFusedMoEMethod.experts = route, experts
        CustomOp.register_oot(OmniUnquantizedFusedMoEMethod, name=slot)
    elif holder is not OmniUnquantizedFusedMoEMethod:
        for name in ("moe_route", "fused_moe"):
            if name in ops:
                report.left(name, f"{slot} is already replaced by {holder.__qualname__}")
        return
    for name, on in (("moe_route", route), ("fused_moe", experts)):
        if on:
            report.replaced(name, f"{config.OPS[name][0]} -> {config.OPS[name][1]}")


def _register_attention(ops: frozenset[str]) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    targets = []
    if "attention" in ops:
        targets.append(("attention", AttentionBackendEnum.CPU_ATTN, "omniops.vllm.attention.OmniCPUAttentionBackend"))
    if "mla_decode" in ops:
        targets += [("mla_decode", AttentionBackendEnum.CPU_MLA, "omniops.vllm.mla.OmniCPUMLABackend"),
                    ("mla_decode", AttentionBackendEnum.AMX_MLA, "omniops.vllm.mla.OmniAMXMLABackend")]
    taken: dict[str, str] = {}
    for name, member, path in targets:
        if member.is_overridden() and member.get_path() != path:
            taken[name] = f"{member.name} is already overridden by {member.get_path()}"
            continue
        register_backend(member, path)
    for name in dict.fromkeys(n for n, _, _ in targets):
        if name in taken:
            report.left(name, taken[name])
        else:
            report.replaced(name, f"{config.OPS[name][0]} -> {config.OPS[name][1]}")
