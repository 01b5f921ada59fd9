"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts and a prefix cache.

Prefix caching (vLLM v1's scheme): every *full* block of a request's tokens gets a chained hash
``H(parent_hash, tokens of the block)``, so equal hashes mean equal whole prefixes. Computed full blocks are
registered under their hash; a new request reuses the longest run of cached blocks from its start. A block
whose last user ends stays cached but goes to the free queue, evicted least-recently-freed first when a new
block is needed (tail blocks of a request are freed first, so they go before its shared head).

Only block ids live here; the tensors are the runner's. ``usage()`` counts blocks held by live requests;
cached blocks nobody holds count as free (they are reclaimable at once).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from omniops.serving.request import Request

ROOT_HASH = b"omniops-prefix-root"


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(len(tokens).to_bytes(4, "little"))
    for t in tokens:
        h.update(t.to_bytes(8, "little"))
    return h.digest()


class BlockPool:
    """Block ids 0..num_blocks-1 with ref counts, a free queue (LRU order) and the hash -> block map."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks: the KV budget holds no block (got {num_blocks})")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[bytes, int] = {}

    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"allocate: {n} blocks asked, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of[b]
            if h is not None:  # evict its cached content
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.hash_of[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop a reference each; blocks reaching 0 go to the end of the free queue (their hash kept)."""
        for b in blocks:
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] < 0:
                raise RuntimeError(f"block {b} released more often than taken")
            if self.ref_cnt[b] == 0:
                self.free[b] = None

    def register(self, b: int, h: bytes) -> None:
        if self.hash_of[b] is None and h not in self.cached:
            self.hash_of[b] = h
            self.cached[h] = b

    def reset_prefix_cache(self) -> None:
        for b in range(self.num_blocks):
            self.hash_of[b] = None
        self.cached.clear()


class KVCacheManager:
    """Maps requests to blocks: prefix lookup, slot allocation, hashing of newly full blocks, freeing."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return 1.0 - self.pool.num_free() / self.pool.num_blocks

    def _hashes(self, req: Request, num_tokens: int) -> list[bytes]:
        """The chained hashes of the full blocks among the first num_tokens tokens (memoised on req)."""
        bs, hs = self.block_size, req.block_hashes
        while len(hs) < num_tokens // bs:
            i = len(hs)
            hs.append(block_hash(hs[-1] if hs else ROOT_HASH, req.all_token_ids[i * bs:(i + 1) * bs]))
        return hs[:num_tokens // bs]

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks covering the longest prefix of req's tokens, leaving at least one token to compute
        (its logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self._hashes(req, req.num_tokens - 1):
            b = self.pool.cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_prompt_tokens
        self.hits += num_hit_tokens

    def blocks_needed(self, req: Request, num_new_tokens: int, prefix: list[int] = ()) -> int:
        total = -(-(req.num_computed_tokens + len(prefix) * self.block_size + num_new_tokens) // self.block_size)
        return max(0, total - len(req.block_ids) - len(prefix))

    def can_allocate(self, req: Request, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        # prefix blocks nobody holds sit in the free queue: taking them shrinks what is free
        idle_prefix = sum(1 for b in prefix if self.pool.ref_cnt[b] == 0)
        return self.blocks_needed(req, num_new_tokens, prefix) + idle_prefix <= self.pool.num_free()

    def allocate(self, req: Request, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Give req the blocks for num_new_tokens more tokens (after taking ``prefix``). False if they do not fit;
        then nothing changed."""
        if not self.can_allocate(req, num_new_tokens, prefix):
            return False
        if prefix:
            self.pool.touch(list(prefix))
            req.block_ids.extend(prefix)
            req.num_computed_tokens += len(prefix) * self.block_size
        req.block_ids.extend(self.pool.allocate(self.blocks_needed(req, num_new_tokens)))
        return True

    def cache_computed_blocks(self, req: Request) -> None:
        """Register the full blocks whose KV is now computed."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes(req, req.num_computed_tokens)
        # once per block, not every block every step: a decoding request fills one block per block_size steps
        for i in range(min(req.num_registered_blocks, len(hashes)), len(hashes)):
            self.pool.register(req.block_ids[i], hashes[i])
        req.num_registered_blocks = len(hashes)

    def free(self, req: Request) -> None:
        self.pool.release(req.block_ids[::-1])  # tail first: evicted before the (more shareable) head
        req.block_ids = []
        req.num_registered_blocks = 0

    def check_all_free(self) -> None:
        """The invariant once no request is live: every block free, no reference left."""
        held = [b for b, c in enumerate(self.pool.ref_cnt) if c]
        if held or self.pool.num_free() != self.pool.num_blocks:
            raise AssertionError(f"KV blocks still held: {held[:16]} ({len(held)} blocks)")
