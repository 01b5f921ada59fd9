"""The KV port's wire format and the cache layout both ends must agree on.

A message is ``u32 header length | u64 payload length | JSON header | payload``. The payload of a block read is
the requested blocks of every cache tensor, tensor after tensor (``[n, block_size, ...]`` each, in the order of
``cache_tensors``), so the receiver can copy each tensor's slice into its own cache as it arrives and never holds
the whole transfer in memory.

Cache tensors are ``[num_blocks, block_size, ...]`` whatever the family: GQA models have ``k_caches`` and
``v_caches`` (one per layer, ``[num_blocks, block_size, kv_heads, head_dim]``), DeepSeek's MLA has one latent
``kv_caches`` tensor per layer (``[num_blocks, block_size, kv_lora_rank + rope_dim]``). One block of one tensor
is a contiguous slice, so a transfer is ``index_select`` over dim 0 on the sender and ``index_copy_`` on the
receiver, no per-token work.
"""

from __future__ import annotations

import json
import socket
import struct

import torch
from torch import Tensor

_PREFIX = struct.Struct("<IQ")
MAX_HEADER = 1 << 20


class KVTransferError(RuntimeError):
    """A transfer failed: the peer is gone, answered an error, or its cache does not match ours."""


def cache_tensors(model) -> list[Tensor]:
    """Every KV cache tensor of a model, in a fixed order (what a transfer walks)."""
    if getattr(model, "kv_caches", None):  # MLA: one latent cache per layer
        return list(model.kv_caches)
    ks, vs = getattr(model, "k_caches", None), getattr(model, "v_caches", None)
    if ks and vs:
        return [t for pair in zip(ks, vs, strict=True) for t in pair]
    raise KVTransferError(f"{type(model).__name__}: no KV cache tensors (k_caches/v_caches or kv_caches)")


def layout(tensors: list[Tensor]) -> dict:
    """What must match between two engines for their blocks to be interchangeable."""
    t = tensors[0]
    return {"num_tensors": len(tensors), "block_size": int(t.shape[1]), "dtype": str(t.dtype).removeprefix("torch."),
            "shapes": [list(x.shape[1:]) for x in tensors]}


def check_layout(mine: dict, theirs: dict) -> None:
    if theirs.get("block_size") != mine["block_size"]:
        raise KVTransferError(f"block size mismatch: the prefill engine has {theirs.get('block_size')}-token blocks, "
                              f"this engine {mine['block_size']}; start both with the same --block-size")
    for key in ("dtype", "num_tensors", "shapes"):
        if theirs.get(key) != mine[key]:
            raise KVTransferError(f"KV cache mismatch ({key}): remote {theirs.get(key)} vs local {mine[key]}; "
                                  "both engines must serve the same model with the same --dtype")


def block_bytes(t: Tensor) -> int:
    return t[0].numel() * t.element_size()


def send_msg(sock: socket.socket, header: dict, payload: list[Tensor] = ()) -> None:
    """Header, then each payload tensor's bytes (contiguous; sent from its own memory, no join)."""
    head = json.dumps(header).encode()
    chunks = [p.contiguous().view(torch.uint8).reshape(-1) for p in payload]
    sock.sendall(_PREFIX.pack(len(head), sum(c.numel() for c in chunks)) + head)
    for c in chunks:
        if c.numel():
            sock.sendall(memoryview(c.numpy()))


def recv_exact(sock: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise KVTransferError(f"connection closed after {got} of {len(buf)} bytes")
        got += n


def recv_header(sock: socket.socket) -> tuple[dict, int]:
    """A message's header and the length of the payload that follows it (still unread)."""
    pre = bytearray(_PREFIX.size)
    recv_exact(sock, memoryview(pre))
    hlen, plen = _PREFIX.unpack(pre)
    if hlen > MAX_HEADER:
        raise KVTransferError(f"header of {hlen} bytes: not a KV-port peer")
    head = bytearray(hlen)
    recv_exact(sock, memoryview(head))
    return json.loads(head), plen


def recv_into_tensor(sock: socket.socket, out: Tensor) -> None:
    """Fill a contiguous tensor with the next ``out.nbytes`` payload bytes."""
    recv_exact(sock, memoryview(out.view(torch.uint8).reshape(-1).numpy()))


def gather(tensors: list[Tensor], block_ids: list[int]) -> list[Tensor]:
    idx = torch.tensor(block_ids, dtype=torch.long)
    return [t.index_select(0, idx) for t in tensors]
