"""Fixtures for the vLLM plugin tests (issue 15): tiny float32 checkpoints, and plain vLLM's completions of the
test prompts, computed once per session and shared by the server and the offline tests."""

from __future__ import annotations

import pytest
from omniops.bench.servers import Server

from omniops.serving.tiny import write_tiny_checkpoint
from tests.vllm_plugin._vllm_peer import ARCHS, START_TIMEOUT, complete


@pytest.fixture(scope="session")
def vllm_checkpoint(tmp_path_factory):
    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            made[arch] = str(write_tiny_checkpoint(tmp_path_factory.mktemp(f"vllm-{arch}"), arch, dtype="float32",
                                                   overrides=ARCHS[arch][0]))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def plain_outputs(vllm_checkpoint, tmp_path_factory):
    """``plain_outputs(arch)`` -> (completions of plain vLLM, its log text), one server run per arch."""
    done: dict[str, tuple[list[str], str]] = {}

    def get(arch: str) -> tuple[list[str], str]:
        if arch not in done:
            log = tmp_path_factory.mktemp("vllm-logs") / f"plain_{arch}.log"
            with Server("vllm", vllm_checkpoint(arch), log, start_timeout=START_TIMEOUT, dtype="float32",
                        extra_args=ARCHS[arch][1]) as srv:
                done[arch] = (complete(srv.port, srv.model_id), log.read_text(errors="replace"))
        return done[arch]

    return get
