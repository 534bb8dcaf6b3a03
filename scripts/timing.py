"""Timing helpers the benchmarks share (scripts/benchmark.py, scripts/lm_benchmark.py): a
device sync, the CPU's name, queued and single-call timings, and a matmul peak."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_queued(fn: Callable[[], None], device: torch.device, calls: int) -> float:
    """Seconds per call of ``calls`` calls queued back to back with one sync at the end, after
    one untimed call: what a call adds to a loop that does not wait for the device (an EMA
    update between steps), without a sync's round trip per call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def time_calls(fn: Callable[[], None], device: torch.device, calls: int,
               best: bool = False) -> float:
    """Median (or, with ``best``, the shortest) seconds of one call, after one untimed call."""
    fn()
    sync(device)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The best rate of square matmuls of sizes n / 2, n and 2 n, 5 timed calls each: a peak,
    so the fastest call counts (a neighbour on a shared machine only slows calls down)."""
    best = 0.0
    for size in (n // 2, n, 2 * n):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        seconds = time_calls(lambda: torch.mm(a, b), device, calls=5, best=True)  # noqa: B023
        best = max(best, 2 * size**3 / seconds / 1e12)
    return best


def machine(device: str, name: str, **extra: object) -> dict:
    """A benchmark result's "machine": the device, its name, the CPU, torch and Python."""
    return {"device": device, "device_name": name, "cpu": cpu_model(),
            "torch": torch.__version__, "python": platform.python_version(), **extra}


def emit(result: dict, header: str, table: str, json_path: str | None) -> dict:
    """Print a benchmark's header line and table, write its result as JSON (atomically) when
    asked, and return it."""
    import json

    from swa_research.fileio import atomic_write_text

    print(header)
    print(table)
    if json_path:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    return result
