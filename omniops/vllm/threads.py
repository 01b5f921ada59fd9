"""The omni kernels' own threads inside vLLM's CPU worker (``OMNI_VLLM_THREADS``).

vLLM-CPU binds its worker's compute to ``cores - reserved`` OpenMP threads, one core kept for the API server
and the engine core (on 2 cores: one compute thread). The omni kernels the plugin calls can run on omniops'
cooperative pool instead (``omniops.set_kernel_threads``): its helpers pick up blocks of a kernel when they
get a core and are never waited for when they do not, so a helper on the reserved core takes that core's idle
time (the scheduler and the HTTP front end are idle for most of a decode step) without stalling the step
when they are busy. vLLM's own ops (oneDNN linears, Inductor's code) keep vLLM's threads.

``OMNI_VLLM_THREADS``: ``auto`` (default) = one kernel thread per CPU of the machine, or vLLM's threads only
where they already cover every CPU (``VLLM_CPU_OMP_THREADS_BIND`` over all cores: a pool beside them
oversubscribes the cores and their spinning OpenMP threads; Intel SPR, 2 cores: 184 vs 272 output tok/s served),
``1`` = vLLM's threads only (the kernels on torch's pool), ``N`` = N threads. Started once, in the worker,
after vLLM bound its threads (the MoE layers' weight loading calls :func:`start_kernel_threads`).
"""

from __future__ import annotations

import logging
import os

import torch

import omniops
from omniops._backends import env

ENV = "OMNI_VLLM_THREADS"
logger = logging.getLogger("vllm.omniops")  # a child of vLLM's logger (its handler and format)
_started = False


def wanted_threads(value: str | None, cpus: int, compute_threads: int = 1) -> int:
    """Kernel threads for an ``OMNI_VLLM_THREADS`` value on a machine of ``cpus`` usable CPUs where vLLM's
    worker computes on ``compute_threads`` OpenMP threads."""
    v = (value or "auto").strip().lower()
    if v == "auto":
        return 1 if compute_threads >= cpus else max(1, cpus)
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{ENV}: expected 'auto' or a thread count, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{ENV}: expected a thread count >= 1, got {n}")
    return n


def _machine_cpus() -> set[int]:
    # every CPU: vLLM has narrowed the main thread's mask (and with it /proc/self/status); sched_setaffinity
    # drops the ones the process's cpuset does not allow
    return set(range(os.cpu_count() or 1))


def start_kernel_threads() -> int:
    """Start the pool once per process; returns its thread count. The helpers are created while the calling
    thread may run on every CPU of the process (they inherit that mask), then the caller's own binding is
    restored, so vLLM's compute thread stays where vLLM put it."""
    global _started
    if _started or omniops.cpu_info().get("isa") is None:
        return omniops.get_kernel_threads()
    _started = True
    mine = os.sched_getaffinity(0)
    cpus = _machine_cpus() | mine
    n = wanted_threads(env(ENV), len(cpus), torch.get_num_threads())
    if n <= 1:
        return 1
    try:
        os.sched_setaffinity(0, cpus)
        omniops.set_kernel_threads(n)
    finally:
        os.sched_setaffinity(0, mine)
    logger.info("omniops vLLM plugin: omni kernels on %d threads (vLLM's compute thread on CPUs %s, helpers on %s)",
                n, sorted(mine), sorted(cpus))
    return n
