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


@pytest.mark.parametrize("arch", list(ARCHS))
def test_offline_llm_with_plugin(arch, vllm_checkpoint, plain_outputs, tmp_path):
    plain, _ = plain_outputs(arch)
    traces = tmp_path / "traces"
    spec = {"model": vllm_checkpoint(arch), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
            "profiler_config": profiler_config(traces), "llm_kwargs": ARCHS[arch][2]}
    proc = subprocess.run([str(PEERS_PY), str(SCRIPT), json.dumps(spec)], env=target_env("vllm_omni"), cwd=ROOT,
                          capture_output=True, text=True, timeout=START_TIMEOUT, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    got = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert got == plain
    check_plugin_log(out)
    wait_traces(traces)
    check_profile(arch, traces)
