"""Runs fuzz cases in child processes, at most two at a time, so that a crash is a failing case and not a dead run.

A child (fuzz_child.py) gets a batch of case ids on stdin and prints ``S <id>`` before and ``R <record>`` after
each case. When it dies (a signal, an abort) or stalls, the case it had started is recorded as the crash or hang,
and a new child continues with the rest of the batch.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("fuzz_child.py")
BATCH = 2000  # cases per child process (a child starts in seconds; a case takes about a millisecond)
STALL_S = 90.0  # a case that runs this long is a hang


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _run_batch(params: dict[str, Any], ids: list[str], out: dict[str, dict[str, Any]]) -> None:
    todo = list(ids)
    while todo:
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONFAULTHANDLER="1")
        proc = subprocess.Popen([sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=str(CHILD.parent))
        proc.stdin.write(json.dumps({**params, "ids": todo}))
        proc.stdin.close()
        lines: queue.Queue[str | None] = queue.Queue()
        err: list[str] = []
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        threading.Thread(target=err.extend, args=(proc.stderr,), daemon=True).start()
        started: str | None = None
        done: set[str] = set()
        hung = False
        stall = float(params.get("stall", STALL_S))
        while True:
            try:
                line = lines.get(timeout=stall)
            except queue.Empty:
                hung = True
                proc.kill()
                break
            if line is None:
                break
            tag, _, body = line.rstrip("\n").partition("\t")
            if tag == "S":
                started = body
            elif tag == "R":
                rec = json.loads(body)
                out[rec.pop("id")] = rec
                done.add(started or "")
                started = None
        rc = proc.wait()
        if started is not None:
            how = f"hang (no result in {stall:.0f} s)" if hung else f"crash (exit status {rc})"
            out[started] = {"outcome": "fail", "why": how, "stderr": "".join(err)[-1500:]}
            done.add(started)
        elif rc != 0 and not done:
            raise RuntimeError(f"fuzz child failed before any case (exit {rc}): {''.join(err)[-3000:]}")
        todo = [i for i in todo if i not in out]


def job_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def run(jobs: Iterable[tuple[dict[str, Any], list[str]]], workers: int = 2) -> dict[str, dict[str, dict[str, Any]]]:
    """jobs: (child parameters, case ids). Returns {json(params): {case id: record}}."""
    work: queue.Queue[tuple[dict[str, Any], list[str], dict[str, dict[str, Any]]]] = queue.Queue()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for params, ids in jobs:
        res = results.setdefault(job_key(params), {})
        for i in range(0, len(ids), BATCH):
            work.put((params, ids[i:i + BATCH], res))
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            try:
                params, ids, res = work.get_nowait()
            except queue.Empty:
                return
            try:
                _run_batch(params, ids, res)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
