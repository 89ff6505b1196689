"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from typing import Any, Callable

import numpy as np


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS in a thread; ``peak - start`` is the extra memory a call needed."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_gib(self) -> float:
        return (self.peak - self.start) / 2**30


def time_fn(fn: Callable[[], Any], runs: int, warmup: int = 1) -> dict[str, float]:
    """Median/min seconds of ``fn`` after warm-up, and the peak extra RSS over the timed runs."""
    for _ in range(warmup):
        fn()
    times = []
    with PeakRSS() as mem:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_extra_gib": mem.extra_gib,
        "runs": runs,
    }


def machine_description() -> str:
    """CPU model and core count (or the accelerator JAX sees)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} ({dev.platform})"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def report(name: str, ours: dict[str, float], ref: dict[str, float] | None, extra: str = "") -> str:
    """One human-readable result block with the ratio ours/reference."""
    lines = [f"== {name} on {machine_description()} {extra}".rstrip()]
    lines.append(
        f"  jax (ours):        median {ours['median_s']:.3f} s  min {ours['min_s']:.3f} s  "
        f"peak extra RSS {ours['peak_extra_gib']:.2f} GiB"
    )
    if ref is not None:
        lines.append(
            f"  torch (reference): median {ref['median_s']:.3f} s  min {ref['min_s']:.3f} s  "
            f"peak extra RSS {ref['peak_extra_gib']:.2f} GiB"
        )
        lines.append(f"  ratio ours/reference (median): {ours['median_s'] / ref['median_s']:.3f}")
    return "\n".join(lines)


def max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| as a float."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
