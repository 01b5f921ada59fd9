"""What the plugin replaced in this process, and the one startup log line that says so.

Registration records a decision per ``OMNI_VLLM_OPS`` name (replaced, or left with the reason). The line is
logged once per process, when the first replaced layer is built (so only processes that build a model log it,
not vLLM's API server or engine-core processes). Layers the replacement cannot serve (say an RMSNorm without a
weight) keep vLLM's implementation; each such case is counted and logged once with its reason.
"""

from __future__ import annotations

import logging
from collections import Counter

# a child of vLLM's logger: the line gets vLLM's handler, format and process prefix
log = logging.getLogger("vllm.omniops")

_replaced: dict[str, str] = {}
_left: dict[str, str] = {}
_fallbacks: Counter[tuple[str, str]] = Counter()
_logged = False


def replaced(name: str, what: str) -> None:
    _replaced[name] = what
    _left.pop(name, None)


def left(name: str, why: str) -> None:
    _left[name] = why
    _replaced.pop(name, None)


def line() -> str:
    rep = "; ".join(f"{k}: {v}" for k, v in _replaced.items()) or "nothing"
    lft = "; ".join(f"{k} ({v})" for k, v in _left.items()) or "nothing"
    return f"omniops vLLM plugin: replaced {rep} | left to vLLM: {lft}"


def layer_built(name: str, why_not: str | None = None) -> None:
    """A layer of kind ``name`` was built; ``why_not``: the reason it keeps vLLM's implementation, else None."""
    global _logged
    if not _logged:
        _logged = True
        log.info(line())
    if why_not is None:
        return
    key = (name, why_not)
    if not _fallbacks[key]:
        log.warning("omniops vLLM plugin: a %s layer keeps vLLM's implementation: %s", name, why_not)
    _fallbacks[key] += 1

