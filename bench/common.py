"""Shared benchmark helpers: interleaved timing (the machine is noisy, so A/B cases alternate in one process)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable

import torch


def machine() -> str:
    """CPU model, torch version, threads, OpenMP wait policy and the 1-minute load (other processes skew absolute
    times)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
    wait = os.environ.get("OMP_WAIT_POLICY", "default")
    return (
        f"{cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads; {os.cpu_count()} cores; "
        f"OMP_WAIT_POLICY {wait}; 1-min load {load}"
    )


def interleaved_times(
    cases: dict[Hashable, Callable[[], None]], repeats: int, warmup: int = 2
) -> dict[Hashable, list[float]]:
    """Seconds of every call of each case, running the cases round-robin so drift hits them all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[Hashable, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved(cases: dict[Hashable, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[Hashable, float]:
    """Median seconds per call of each case (see :func:`interleaved_times`)."""
    return {name: statistics.median(t) for name, t in interleaved_times(cases, repeats, warmup).items()}
