"""Prefill/decode disaggregation: engine roles and the KV hand-off between engines over TCP (vLLM's
``kv_transfer_params`` protocol, so omni-proxy can drive vLLM engines and vLLM's proxies can drive these)."""

from omniops.serving.kv_transfer.connector import ROLES, KVConnector
from omniops.serving.kv_transfer.wire import KVTransferError, cache_tensors

__all__ = ["ROLES", "KVConnector", "KVTransferError", "cache_tensors"]
