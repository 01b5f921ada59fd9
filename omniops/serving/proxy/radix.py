"""An approximate radix tree of the prompts sent to each engine (sglang-router's / vllm-router's cache_aware).

Approximate because it only models what each engine's prefix cache probably holds: prompts are inserted as
text (characters, not tokens: the proxy has no tokenizer), and each engine's share is capped at
``max_chars_per_tenant`` by evicting its least recently used leaves, as the engine's own cache evicts. Each
node records, per tenant (engine), when that tenant last used the path through it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class _Node:
    edge: str = ""
    parent: _Node | None = None
    children: dict[str, _Node] = field(default_factory=dict)  # first char of the child's edge -> child
    tenants: dict[str, int] = field(default_factory=dict)  # tenant -> last access (a logical clock)


def _common(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixTree:
    def __init__(self, max_chars_per_tenant: int = 1 << 20):
        self.root = _Node()
        self.max_chars = max_chars_per_tenant
        self.chars: dict[str, int] = {}  # tenant -> characters of the tree it is on
        self._clock = itertools.count(1)

    def insert(self, text: str, tenant: str) -> None:
        now = next(self._clock)
        node, i = self.root, 0
        node.tenants[tenant] = now
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = _Node(text[i:], node)
                node.children[text[i]] = child
                self._add(child, tenant, now)
                break
            k = _common(child.edge, text[i:])
            if k < len(child.edge):  # split the edge: the shared part becomes a node of its own
                mid = _Node(child.edge[:k], node, {child.edge[k]: child}, dict(child.tenants))
                node.children[text[i]] = mid
                child.edge, child.parent = child.edge[k:], mid
                child = mid
            self._add(child, tenant, now)
            node, i = child, i + k
        if self.chars.get(tenant, 0) > self.max_chars:
            self.evict(tenant, int(self.max_chars * 0.9))

    def _add(self, node: _Node, tenant: str, now: int) -> None:
        if tenant not in node.tenants:
            self.chars[tenant] = self.chars.get(tenant, 0) + len(node.edge)
        node.tenants[tenant] = now

    def prefix_match(self, text: str, tenants: set[str] | None = None) -> tuple[int, str | None]:
        """(characters of ``text`` matched, the tenant holding that longest match), among ``tenants`` if
        given; ties go to the tenant that used the path most recently."""
        node, i, best = self.root, 0, (0, None)
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            live = {t: ts for t, ts in child.tenants.items() if tenants is None or t in tenants}
            if not live:
                break
            k = _common(child.edge, text[i:])
            i += k
            best = (i, max(live, key=live.get))
            if k < len(child.edge):
                break
            node = child
        return best

    def evict(self, tenant: str, target_chars: int) -> None:
        """Drop ``tenant`` from its least recently used leaves until it holds at most target_chars."""
        while self.chars.get(tenant, 0) > target_chars:
            leaves = [n for n in self._nodes() if tenant in n.tenants and n is not self.root
                      and not any(tenant in c.tenants for c in n.children.values())]
            if not leaves:
                break
            for leaf in sorted(leaves, key=lambda n: n.tenants[tenant]):
                self._remove(leaf, tenant)
                if self.chars[tenant] <= target_chars:
                    break

    def remove_tenant(self, tenant: str) -> None:
        """An engine left for good (or restarted with an empty cache): forget its share."""
        for n in list(self._nodes()):
            if tenant in n.tenants and n is not self.root:
                self._remove(n, tenant)
        self.root.tenants.pop(tenant, None)
        self.chars.pop(tenant, None)

    def _remove(self, node: _Node, tenant: str) -> None:
        if node.tenants.pop(tenant, None) is not None:
            self.chars[tenant] -= len(node.edge)
        while not node.tenants and not node.children and node.parent is not None:  # prune the dead branch
            node.parent.children.pop(node.edge[0], None)
            node = node.parent

    def _nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
