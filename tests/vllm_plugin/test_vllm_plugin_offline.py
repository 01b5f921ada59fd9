"""vLLM's offline ``LLM(...)`` with the omniops plugin: the plain server's greedy float32 completions, the
startup line, the omni ops in a profile (issue 15). The engine runs in a subprocess (``_offline_llm.py``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from omniops.bench.servers import PEERS_PY, ROOT, target_env

from tests.vllm_plugin._vllm_peer import (
    ARCHS,
    MAX_TOKENS,
    PROMPTS,
    START_TIMEOUT,
    check_plugin_log,
    check_profile,
    profiler_config,
    skip_reason,
    wait_traces,
)

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=f"vLLM plugin peer: {skip_reason()}")
SCRIPT = Path(__file__).with_name("_offline_llm.py")


def run_offline(model: str, traces, llm_kwargs: dict, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """(completions of PROMPTS, the process output) of ``_offline_llm.py`` under .venv-peers with the plugin."""
    spec = {"model": model, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "profiler_config": profiler_config(traces),
            "llm_kwargs": llm_kwargs}
    proc = subprocess.run([str(PEERS_PY), str(SCRIPT), json.dumps(spec)], cwd=ROOT, capture_output=True, text=True,
                          env={**target_env("vllm_omni"), **(env or {})}, timeout=START_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    result = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(result[len("RESULT "):]), out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_offline_llm_with_plugin(arch, vllm_checkpoint, plain_outputs, tmp_path):
    plain, _ = plain_outputs(arch)
    traces = tmp_path / "traces"
    got, out = run_offline(vllm_checkpoint(arch), traces, ARCHS[arch][2])
    assert got == plain
    check_plugin_log(out)
    wait_traces(traces)
    check_profile(arch, traces)


def test_offline_llm_omni_compile_backend(vllm_checkpoint, plain_outputs, tmp_path):
    """``compilation_config={"mode": 2, "backend": "omni"}``: vLLM compiles with the omni graph passes (the
    documented flag; AOT compile off because the omni backend's compiled graphs are not serializable)."""
    plain, _ = plain_outputs("qwen3_moe")
    got, out = run_offline(vllm_checkpoint("qwen3_moe"), tmp_path / "traces",
                           {"compilation_config": {"mode": 2, "backend": "omni"}},
                           env={"VLLM_USE_AOT_COMPILE": "0", "OMNI_LOG": "passes"})
    assert got == plain
    # the passes ran on vLLM's graph (OMNI_LOG=passes prints their report) and saw the plugin's omni ops in it
    assert "omni passes: 1 graph(s) rewritten" in out, out[-4000:]
    assert "omni ops in the graphs:" in out and "fused_moe x" in out
