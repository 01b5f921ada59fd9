"""omni-serve's engine core process (``omniops.serving.engine_core``): the delta encoding of outputs over its pipe
round-trips; the core idles without burning CPU; a killed core takes the server down with exit status 1 (no hang,
no zombie serving 503s forever); a server killed with SIGKILL takes its core with it (no orphan holding memory)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from omniops.serving.engine_loop import OutputDecoder, OutputEncoder
from omniops.serving.outputs import CompletionOutput, Logprob, RequestOutput
from tests.serving._server import OmniServer

ARGS = ("--enforce-eager", "--max-model-len", "128", "--kv-cache-memory", "0.01")


def _out(rid: str, text: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    lps = [{t: Logprob(-0.5 * t, 1)} for t in tokens]
    comp = CompletionOutput(0, text, tokens, lps, "stop" if finished else None, "!" if finished else None)
    return RequestOutput(rid, "hi", [1, 2, 3], [comp], finished, 2, {"last_token": float(len(tokens))})


def test_output_deltas_round_trip():
    enc, dec = OutputEncoder(), OutputDecoder()
    steps = [_out("a", "x", [4]), _out("b", "", [9]), _out("a", "xyz", [4, 5]), _out("a", "xyz!", [4, 5, 6], True)]
    for want in steps:
        msg = enc.encode(want)
        got = dec.decode(msg)
        assert got == want
    # only the delta travels after the first output of a request, and finished requests leave no state behind
    assert enc.encode(_out("b", "", [9, 10]))[1:4] == (None, "", [10])
    assert "a" not in enc._sent and "a" not in dec._last
    dec.forget("b")  # the client closed "b": its late outputs are dropped
    assert dec.decode(enc.encode(_out("b", "q", [9, 10, 11]))) is None


def _core_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    cores = [int(c) for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(cores) == 1, children
    return cores[0]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _complete(srv: OmniServer, n: int = 4) -> dict:
    r = httpx.post(f"{srv.base_url}/completions", json={"prompt": "one two three", "max_tokens": n,
                                                        "ignore_eos": True, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_killed_core_stops_the_server(checkpoint, tmp_path):
    srv = OmniServer(checkpoint("llama"), tmp_path / "server.log", *ARGS).start()
    try:
        assert "engine core process" in srv.log()
        assert _complete(srv)["usage"]["completion_tokens"] == 4
        core = _core_pid(srv.proc.pid)
        t0 = _cpu_seconds(core)
        time.sleep(1.0)
        assert _cpu_seconds(core) - t0 < 0.1, "the idle engine core burns CPU"
        os.kill(core, signal.SIGKILL)
        assert srv.proc.wait(30) == 1
        assert "the engine core exited (code -9)" in srv.log()
    finally:
        srv.stop()


def test_core_dies_with_a_killed_server(checkpoint, tmp_path):
    srv = OmniServer(checkpoint("llama"), tmp_path / "server.log", *ARGS).start()
    try:
        core = _core_pid(srv.proc.pid)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{core}").exists() and time.monotonic() < deadline:
            try:  # gone, or a zombie until init reaps it
                if Path(f"/proc/{core}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.1)
        else:
            assert not Path(f"/proc/{core}").exists(), "the engine core outlived its server"
    finally:
        srv.stop()
