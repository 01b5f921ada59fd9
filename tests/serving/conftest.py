"""Shared fixtures: tiny random checkpoints written once per session, and prompts of mixed lengths."""

from __future__ import annotations

import random

import pytest

from omniops.serving.tiny import write_tiny_checkpoint

FAMILIES = ("llama", "qwen3_moe", "deepseek_v3")
_WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet hills "
          "near the old river where children play and birds sing").split()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch, dtype="float32", **kw)`` -> path of a tiny checkpoint (written once per arguments)."""
    made: dict[tuple, str] = {}

    def get(arch: str, dtype: str = "float32", **kw) -> str:
        key = (arch, dtype, repr(sorted(kw.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"{arch}-{dtype}")
            made[key] = str(write_tiny_checkpoint(d, arch, dtype=dtype, **kw))
        return made[key]

    return get


def mixed_prompts(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(1, max_words))) for _ in range(n)]
