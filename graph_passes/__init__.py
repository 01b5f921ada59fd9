"""torch.compile backend "omni": Inductor plus FX rewrites of the post-grad graph onto omni ops
(installed as ``omniops.graph_passes``).

Two routes, usable together:

* graph passes — ``torch.compile(model, backend="omni")`` on an unmodified model: HF RMSNorm and residual
  add + RMSNorm -> ``omni::rms_norm`` / ``omni::fused_add_rms_norm``, SiLU-and-mul -> ``omni::silu_and_mul``,
  softmax top-k routers and DeepSeek-V3's grouped sigmoid router -> ``omni::moe_route``, HF grouped_mm
  experts -> ``omni::fused_moe``, HF rotary embedding (``apply_rotary_pos_emb`` / ``rotate_half``, q and k
  together) -> ``omni::rotary_embedding``, attention (CPU: SDPA, its math path, HF's eager form; repeat_kv
  stripped) -> ``omni::gqa_attention``, decode-sized dense linears (CPU) -> ``omni::grouped_gemm``,
  QuantLinear's activation quantization + GEMM -> ``omni::w8a8_linear`` / ``omni::fp8_block_linear``.
* ``prepare(model)`` — switches an HF model's experts / attention implementation to the "omni" entries of
  transformers' ``ALL_EXPERTS_FUNCTIONS`` / ``ALL_ATTENTION_FUNCTIONS``, its routers to ``moe_route`` and
  DeepSeek-V3's MLA decode steps to the weight-absorbed form.

``configure(...)`` / ``options={...}`` turn passes on and off; ``report()`` (or ``OMNI_LOG=passes``) says
what matched and what did not.
"""

from omniops.graph_passes.backend import OmniGraphPass, omni_backend
from omniops.graph_passes.config import PassConfig, configure
from omniops.graph_passes.hf import prepare, register
from omniops.graph_passes.report import PassReport, report, reset_report

__all__ = [
    "OmniGraphPass",
    "PassConfig",
    "PassReport",
    "configure",
    "omni_backend",
    "prepare",
    "register",
    "report",
    "reset_report",
]
