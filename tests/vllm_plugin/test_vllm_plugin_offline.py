"""vLLM's offline ``LLM(...)`` with the omniops plugin: the plain server's greedy float32 completions, the
startup line, the omni ops in a profile (issue 15). The engine runs in a subprocess (``_offline_llm.py``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from omniops.bench.servers import PEERS_PY, ROOT, target_env

from omniops.vllm.trace import count_omni_events
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


def test_ops_subset_registration():
    """OMNI_VLLM_OPS=rms_norm,fused_moe registers just those, the line says why the rest stays vLLM's; the
    registration is idempotent (vLLM may call it again in one process)."""
    code = ("from omniops.vllm import plugin, report; plugin.register(); plugin.register(); "
            "from vllm.model_executor.custom_op import op_registry_oot as r; print(sorted(r)); print(report.line())")
    env = {**target_env("vllm_omni"), "OMNI_VLLM_OPS": "rms_norm,fused_moe"}
    proc = subprocess.run([str(PEERS_PY), "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    registry, line = proc.stdout.strip().splitlines()[-2:]
    assert registry == "['RMSNorm', 'UnquantizedFusedMoEMethod']"
    replaced, left = line.split("| left to vLLM:")
    assert "rms_norm: RMSNorm" in replaced and "fused_moe: " in replaced and "moe_route" not in replaced
    for name in ("silu_and_mul", "rotary_embedding", "moe_route", "attention", "mla_decode"):
        assert f"{name} (not in OMNI_VLLM_OPS)" in left


@pytest.mark.parametrize("part, other", [("fused_moe", "moe_route"), ("moe_route", "fused_moe")])
def test_offline_llm_moe_parts_alone(part, other, vllm_checkpoint, plain_outputs, tmp_path):
    """Either MoE part alone: vLLM's router feeding omni's experts (modular path), or omni's router feeding vLLM's
    experts kernel (monolithic path); same completions, and only that part's omni op in the profile."""
    plain, _ = plain_outputs("qwen3_moe")
    traces = tmp_path / "traces"
    got, _ = run_offline(vllm_checkpoint("qwen3_moe"), traces, {}, env={"OMNI_VLLM_OPS": part})
    assert got == plain
    wait_traces(traces)
    counts = count_omni_events(traces)
    assert counts[f"omni::{part}"] > 0 and counts[f"omni::{other}"] == 0, dict(counts)
