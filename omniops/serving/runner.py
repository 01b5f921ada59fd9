"""Turns a scheduled batch into the model's flat inputs and runs the forward.

Order of the flat batch: decode requests first (one token each), then prefill chunks. Built on the host as
Python lists and converted once per step (a few small tensors), so the per-step overhead stays O(tokens).
"""

from __future__ import annotations

import logging
import time

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


log = logging.getLogger("omniops.serving")


class ModelRunner:
    def __init__(self, model: DecoderModel, block_size: int):
        self.model = model
        self.block_size = block_size
        self.compiled = None  # torch.compile(backend="omni") of the flat forward, when chosen
        self.compiled_fn = None  # the compiled forward, chosen or not
        self.compiled_steps = 0
        self.compile_report = "eager (enforce_eager)"

    # ---- torch.compile ---------------------------------------------------------------------------------
    def _flat_forward(self, input_ids: Tensor, positions: Tensor, slot_mapping: Tensor, cu_seqlens: Tensor,
                      block_table: Tensor, context_lens: Tensor) -> Tensor:
        # a decode-only graph (MLA) knows every sequence has one new token: num_decode = the token count
        nd = input_ids.shape[0] if self.model.compile_scope == "decode" else 0
        meta = AttentionMetadata(positions, slot_mapping, cu_seqlens, block_table, context_lens, num_decode=nd)
        return self.model.forward(input_ids, meta)

    def _compiled_serves(self, meta: AttentionMetadata) -> bool:
        if self.compiled is None:
            return False
        return self.model.compile_scope == "all" or not meta.prefill_query

    def _forward(self, input_ids: Tensor, meta: AttentionMetadata) -> Tensor:
        if not self._compiled_serves(meta):
            return self.model.forward(input_ids, meta)
        args = (input_ids, meta.positions, meta.slot_mapping, meta.cu_seqlens, meta.block_table, meta.context_lens)
        for a in args:  # token count, batch and table width are dynamic: one graph, not one per batch size
            torch._dynamo.maybe_mark_dynamic(a, 0)
        torch._dynamo.maybe_mark_dynamic(meta.block_table, 1)
        self.compiled_steps += 1
        return self.compiled(*args)

    def _synthetic(self, chunks: list[int], context: int) -> tuple[Tensor, AttentionMetadata]:
        """A step of sequences with ``chunks[i]`` new tokens after ``context`` cached ones, over the first KV
        blocks (their content is garbage; called before any request owns a block)."""
        bs, B = self.block_size, len(chunks)
        per = (context + max(chunks)) // bs + 1
        table = torch.arange(B * per, dtype=torch.int32).view(B, per)
        pos = torch.cat([torch.arange(context, context + n) for n in chunks])
        seq = torch.repeat_interleave(torch.arange(B), torch.tensor(chunks))
        slots = table[seq, pos // bs].long() * bs + pos % bs
        cu = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
        meta = AttentionMetadata(pos, slots, cu, table, torch.full((B,), context, dtype=torch.int32))
        return torch.randint(0, 100, (len(pos),)), meta

    # shapes whose graphs serving needs: dynamo specialises sizes 0/1 and gives equal sizes one symbol, so
    # warm up with one token, one sequence, and batches whose token count, sequence count and table width differ
    WARMUP = {"all": ([1], [7], [1, 1, 1], [5, 1, 1, 1], [9, 3]), "decode": ([1], [1, 1, 1], [1] * 5)}

    @torch.inference_mode()
    def choose_compile(self, max_batch: int, num_blocks: int) -> str:
        """Compile the forward with backend="omni" and keep it only if it is faster here: per-step time of a
        decode batch, eager vs compiled, measured after warming both (the graphs for 1-token and larger
        batches are built here, not under load). Returns what was decided and why."""
        scope = getattr(self.model, "compile_scope", None)
        batch = max(2, min(max_batch, 8, num_blocks // 6))
        compiled = self.compiled_fn = torch.compile(self._flat_forward, backend="omni", dynamic=False)
        self.compiled = compiled
        t0 = time.perf_counter()
        for chunks in self.WARMUP[scope]:
            ids, meta = self._synthetic(chunks, 40)
            meta.num_decode = len(chunks) if scope == "decode" else 0
            self._forward(ids, meta)
        compile_s = time.perf_counter() - t0
        # interleaved and the best of many: on a shared machine one slow run must not decide
        ids, meta = self._synthetic([1] * batch, 40)
        meta.num_decode = batch
        runs: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(12):
            for name, fn in (("eager", None), ("compiled", compiled)):
                self.compiled = fn
                t = time.perf_counter()
                self._forward(ids, meta)
                runs[name].append(time.perf_counter() - t)
        timings = {name: min(r) for name, r in runs.items()}
        use = timings["compiled"] < timings["eager"]
        self.compiled = compiled if use else None
        what = "compiled (omni backend)" + (", decode-only steps" if scope == "decode" else "")
        self.compile_report = (f"{what if use else 'eager'}: decode step at batch {batch} "
                               f"{timings['compiled'] * 1e3:.2f} ms compiled vs {timings['eager'] * 1e3:.2f} ms "
                               f"eager (compile {compile_s:.0f} s)")
        log.info("runner: %s", self.compile_report)
        return self.compile_report

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
        hidden = self._forward(input_ids, meta)
        if not sample_rows:
            return hidden.new_empty(0, 0, dtype=torch.float32)
        return self.model.logits(hidden[torch.tensor(sample_rows, dtype=torch.long)])
