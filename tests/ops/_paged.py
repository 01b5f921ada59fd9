"""Paged KV caches for the attention tests: scattered blocks, NaN in every slot no sequence owns."""

from __future__ import annotations

import torch

NAN = float("nan")


def make_paged(lens: list[int], block_size: int, tail_shape: tuple[tuple[int, ...], ...], dtype: torch.dtype,
               device: str = "cpu", spare: int = 3) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Caches ``[num_blocks, block_size, *tail]`` (one per entry of tail_shape) where a sequence's blocks are
    scattered at random and every slot no sequence owns (foreign blocks and the tail of each last block) is NaN.
    Table entries past a sequence's blocks hold out-of-range ids (never read)."""
    nblk = [(n + block_size - 1) // block_size for n in lens]
    total = sum(nblk) + spare
    perm = torch.randperm(total)
    max_blocks = max([*nblk, 0]) + 1
    table = torch.full((len(lens), max_blocks), total + 5, dtype=torch.int32)
    caches = [torch.full((total, block_size, *t), NAN, dtype=dtype) for t in tail_shape]
    i = 0
    for b, n in enumerate(lens):
        for j in range(nblk[b]):
            blk = int(perm[i])
            i += 1
            table[b, j] = blk
            cnt = min(block_size, n - j * block_size)
            for c, t in zip(caches, tail_shape, strict=False):
                c[blk, :cnt] = torch.randn(cnt, *t).to(dtype)
    return [c.to(device) for c in caches], table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def small_inputs():
    """The small caches / tables every opcheck, compile and bad-input test starts from."""
    (kc, vc), table, sl = make_paged([5, 18], 16, ((2, 16), (2, 16)), torch.float32)
    (kv,), t2, s2 = make_paged([3, 20], 16, ((40,),), torch.float32)
    return kc, vc, table, sl, kv, t2, s2
