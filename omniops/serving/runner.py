"""Turns a scheduled batch into the model's flat inputs and runs the forward.

Order of the flat batch: decode requests first (one token each), then prefill chunks. Built on the host as
Python lists and converted once per step (a few small tensors), so the per-step overhead stays O(tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from omniops.serving.models import AttentionMetadata, DecoderModel
from omniops.serving.request import Request
from omniops.serving.scheduler import ScheduledBatch


def _table(rows: list[list[int]]) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    t = torch.zeros(len(rows), max(width, 1), dtype=torch.int32)
    for i, r in enumerate(rows):
        if r:
            t[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return t


class ModelRunner:
    def __init__(self, model: DecoderModel, block_size: int):
        self.model = model
        self.block_size = block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[Tensor, AttentionMetadata, list[Request], list[int]]:
        """Returns (input_ids, metadata, requests in flat order, index of each request's last token)."""
        pairs = list(zip(batch.requests, batch.num_new_tokens, strict=True))
        decode = [(r, n) for r, n in pairs if n == 1]
        prefill = [(r, n) for r, n in pairs if n != 1]
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        for r, n in decode + prefill:
            start = r.num_computed_tokens
            ids.extend(r.all_token_ids[start:start + n])
            rng = range(start, start + n)
            pos.extend(rng)
            blocks = r.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in rng)
            last.append(len(ids) - 1)
        cu = [0]
        for _, n in decode + prefill:
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(
            positions=torch.tensor(pos, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            block_table=_table([r.block_ids for r, _ in decode + prefill]),
            context_lens=torch.tensor([r.num_computed_tokens for r, _ in decode + prefill], dtype=torch.int32),
            num_decode=len(decode),
            prefill_context=[r.num_computed_tokens for r, _ in prefill],
            prefill_query=[n for _, n in prefill],
        )
        return torch.tensor(ids, dtype=torch.long), meta, [r for r, _ in decode + prefill], last

    @torch.inference_mode()
    def execute(self, input_ids: Tensor, meta: AttentionMetadata, sample_rows: list[int]) -> Tensor:
        """The forward over the flat batch; fp32 logits of the rows in ``sample_rows``."""
        hidden = self.model.forward(input_ids, meta)
        if not sample_rows:
            return hidden.new_empty(0, 0, dtype=torch.float32)
        return self.model.logits(hidden[torch.tensor(sample_rows, dtype=torch.long)])
