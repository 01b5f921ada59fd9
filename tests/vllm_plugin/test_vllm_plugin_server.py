"""vLLM's OpenAI server with the omniops plugin vs without: same greedy float32 completions, the startup line
names the replacements, and a torch profile of the request shows the omni ops running (issue 15).

One plain and one plugin server per architecture, one at a time (~1-2 minutes each on 2 cores)."""

from __future__ import annotations

import httpx
import pytest
from omniops.bench.servers import Server

from tests.vllm_plugin._vllm_peer import (
    ARCHS,
    HOST,
    PLUGIN_LINE,
    START_TIMEOUT,
    check_plugin_log,
    check_profile,
    complete,
    profiler_args,
    skip_reason,
    wait_traces,
)

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=f"vLLM plugin peer: {skip_reason()}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_plugin_server_matches_plain_vllm(arch, vllm_checkpoint, plain_outputs, tmp_path):
    plain, plain_log = plain_outputs(arch)
    assert PLUGIN_LINE not in plain_log, "VLLM_PLUGINS= (empty) must keep the plugin out of plain vLLM"
    assert all(plain), plain

    traces, log = tmp_path / "traces", tmp_path / f"plugin_{arch}.log"
    with Server("vllm_omni", vllm_checkpoint(arch), log, start_timeout=START_TIMEOUT, dtype="float32",
                extra_args=[*ARCHS[arch][1], *profiler_args(traces)]) as srv:
        base = f"http://{HOST}:{srv.port}"
        httpx.post(f"{base}/start_profile", timeout=60).raise_for_status()
        got = complete(srv.port, srv.model_id)
        httpx.post(f"{base}/stop_profile", timeout=120).raise_for_status()
        wait_traces(traces)
    assert got == plain
    check_plugin_log(log.read_text(errors="replace"))
    check_profile(arch, traces)


def test_bad_ops_selection_stops_vllm(vllm_checkpoint, tmp_path):
    """A typo in OMNI_VLLM_OPS fails vLLM's start (in its first process, before any model load) and says why."""
    log = tmp_path / "bad.log"
    srv = Server("vllm_omni", vllm_checkpoint("qwen3_moe"), log, start_timeout=120, dtype="float32",
                 env={"OMNI_VLLM_OPS": "rms_norm,rms_nrom"})
    with pytest.raises(RuntimeError, match="exited"):
        srv.__enter__()
    assert "OMNI_VLLM_OPS='rms_norm,rms_nrom': unknown rms_nrom" in log.read_text(errors="replace")
