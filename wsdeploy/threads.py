"""How many threads every runtime gets: one per physical core this process may run on.

Kept apart from the TVM target so that a process that only times ONNX Runtime (a benchmark
worker) need not import PyTorch and TVM to learn it.
"""

from __future__ import annotations

import os

THREADS_ENV = "TVM_NUM_THREADS"


def cpu_threads() -> int:
    """Cores this process may run on, one thread each: the CPU affinity's size, capped at the
    physical core count so that hyper-threads are not counted twice."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    import psutil

    return max(1, min(n, psutil.cpu_count(logical=False) or n))


def runtime_threads() -> int:
    """Worker threads TVM's CPU runtime uses in this process (and in processes it starts).

    TVM's own default on x86 is half the logical CPUs, on the assumption that every core is
    hyper-threaded; on a machine without SMT (this 2-core one) that leaves half the cores
    idle: measured here, WSNET.md's layer took 0.67 ms in the fused kernel on TVM's default
    and 0.35 ms on both cores. So unless the user set ``TVM_NUM_THREADS``, it is set to
    ``cpu_threads()`` before TVM's thread pool starts (which is at the first parallel run)."""
    os.environ.setdefault(THREADS_ENV, str(cpu_threads()))
    return int(os.environ[THREADS_ENV])
