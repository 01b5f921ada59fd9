"""omni-serve --ep 2 as a real process: completions equal the --ep 1 engine's, the EP metrics are on /metrics,
and a killed rank takes the server down with exit status 1 and the error in its log (no hang). Plus the
torchrun-style launch: two processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT run the same LLM(...)
command; rank 1 serves from inside LLMEngine and exits 0 when rank 0 is done."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from omniops.serving import LLM, SamplingParams
from tests.serving._server import OmniServer, metrics

PROMPTS = ["the quick brown fox", "seven bright stars shine above quiet hills near the old river"]
ARGS = ("--enforce-eager", "--max-model-len", "256", "--kv-cache-memory", "0.02", "--max-num-batched-tokens", "32")


def _reference(path: str) -> list[str]:
    llm = LLM(path, dtype="float32", max_model_len=256, enforce_eager=True, kv_cache_memory=0.02)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return [o.outputs[0].text for o in outs]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_omni_serve_ep(checkpoint, tmp_path):
    path = checkpoint("deepseek_v3")
    ref = _reference(path)
    srv = OmniServer(path, tmp_path / "server.log", *ARGS, "--ep", "2", "--redundant-experts", "2",
                     "--placement", "dynamic", "--placement-interval", "2").start()
    try:
        for prompt, want in zip(PROMPTS, ref, strict=True):
            r = httpx.post(f"{srv.base_url}/completions", json={"model": path, "prompt": prompt, "max_tokens": 8,
                                                                "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
        m = metrics(srv.url)
        assert m['omni:expert_load_imbalance{layer="1"}'] >= 1.0
        assert m['omni:expert_load_imbalance{layer="2"}'] >= 1.0
        assert m["omni:placement_updates_total"] >= 0 and "omni:placement_seconds_count" in m
        assert m["omni:placement_moved_experts_total"] >= m["omni:placement_updates_total"]
        assert "expert parallel over 2 ranks" in srv.log()
        (worker,) = _children(srv.proc.pid)
        os.kill(worker, signal.SIGKILL)
        r = httpx.post(f"{srv.base_url}/completions", json={"model": path, "prompt": "x", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 500 and "expert-parallel engine is down" in r.text
        assert srv.proc.wait(30) == 1  # the server shut itself down
        assert "omni-serve: expert-parallel engine is down: rank 1 (exit code -9) exited" in srv.log()
    finally:
        srv.stop()


_TORCHRUN_SCRIPT = """
import json, sys
from omniops.serving import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, kv_cache_memory=0.02, ep=2,
          redundant_experts=2, placement="dynamic", placement_interval=2)
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
print("TEXTS", json.dumps([o.outputs[0].text for o in outs]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_style_launch(checkpoint):
    path = checkpoint("qwen3_moe")
    ref = _reference(path)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", _TORCHRUN_SCRIPT, path, json.dumps(PROMPTS)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 120
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("TEXTS "))
    assert json.loads(line[6:]) == ref
    assert "TEXTS" not in outs[1]  # rank 1 never returned from LLM(...)
