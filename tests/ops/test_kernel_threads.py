"""The cooperative kernel pool (``omniops.set_kernel_threads``): same results as torch's pool, a helper that is
kept busy elsewhere cannot stall a launch, bad arguments are named."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import omniops
from omniops import _ext

pytestmark = pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C is not built (the pool is part of it)")


@pytest.fixture
def pool():
    before = omniops.get_kernel_threads()
    yield
    omniops.set_kernel_threads(before)


def _ops(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    T, H, E, inter, k = 37, 256, 8, 128, 2
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    tw, ids = omniops.moe_route(torch.randn(T, E, generator=g), k, scoring="softmax", renormalize=True)
    W = (torch.randn(3, 96, H, generator=g) / H**0.5).to(dtype)
    offs = torch.tensor([0, 10, 10, T])
    B, Hq, Hk, D, bs = 5, 8, 2, 64, 16
    kc = torch.randn(64, bs, Hk, D, generator=g).to(dtype)
    vc = torch.randn(64, bs, Hk, D, generator=g).to(dtype)
    table = torch.randperm(64, generator=g)[:B * 4].view(B, 4).int()
    lens = torch.tensor([1, 17, 40, 64, 33], dtype=torch.int32)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    return [omniops.fused_moe(x, w13, w2, tw, ids), omniops.grouped_gemm(x, W, offs),
            omniops.gqa_decode(q, kc, vc, table, lens), omniops.rms_norm(x, torch.ones(H, dtype=dtype))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_matches_torch_pool(pool, dtype) -> None:
    omniops.set_kernel_threads(1)
    want = _ops(dtype)
    for threads in (2, 3):
        omniops.set_kernel_threads(threads)
        assert omniops.get_kernel_threads() == threads
        got = _ops(dtype)
        # the block split differs (4 blocks a thread), so sums may round differently: bf16 / fp32 tolerance
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_launch_from_several_threads(pool) -> None:
    """Launches from other Python threads while one runs are served inline, never mixed into the running job."""
    omniops.set_kernel_threads(2)
    want = _ops(torch.float32)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                for a, b in zip(_ops(torch.float32), want, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in ts)


def test_idle_pool_sleeps(pool) -> None:
    """After the spin window a helper sleeps: an idle pool costs no CPU."""
    omniops.set_kernel_threads(2)
    _ops(torch.float32)
    time.sleep(0.2)
    t0 = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - t0 < 0.1


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_threads(pool, bad, exc) -> None:
    with pytest.raises(exc, match="threads"):
        omniops.set_kernel_threads(bad)


@pytest.mark.parametrize("bad", [0, -1, 5000])
def test_cpp_entry_rejects_bad_threads(pool, bad) -> None:
    with pytest.raises(ValueError, match="threads"):
        _ext.cpp().set_kernel_threads(bad)


FORK_SCRIPT = """
import os, torch, omniops
omniops.set_kernel_threads(2)
x, w = torch.randn(64, 256), torch.ones(256)
want = omniops.rms_norm(x, w)
pid = os.fork()
if pid == 0:  # the helpers are the parent's: the child runs inline, then may start its own pool
    ok = torch.equal(omniops.rms_norm(x, w), want)
    omniops.set_kernel_threads(2)
    ok = ok and torch.equal(omniops.rms_norm(x, w), want) and omniops.get_kernel_threads() == 2
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_forked_child_and_exit() -> None:
    """A fork while helpers wait (multiprocessing's default on Linux) leaves the child a working pool, and a
    process exits cleanly with its helpers parked (no join from a static destructor)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "child exit 0" in r.stdout, (r.stdout, r.stderr[-2000:])
