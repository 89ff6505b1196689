"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable, Sequence

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


ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
             "avx512_vnni", "amx_bf16", "amx_tile", "sse4_2")
# The flags shown in the one-line summary (the others are implied or rarely decisive).
KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                   "TF_NUM_INTEROP_THREADS")
# Distributions whose versions are reported for each framework a benchmark names.
FRAMEWORK_PACKAGES = {"jax": ("jax", "jaxlib"), "torch": ("torch", "diffusers", "transformers")}


def _read(path: str) -> str | None:
    """The text of a file, or None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _int(value: str | None) -> int | None:
    """An int from decimal or 0x-prefixed text, or None."""
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        try:
            return int(value)
        except ValueError:
            return None


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model, vendor, family/model/stepping, microcode and ISA flags of the text's first CPU."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flag_text = fields.get("flags", fields.get("Features"))
    present = set(flag_text.split()) if flag_text is not None else None
    return {
        "model_name": fields.get("model name") or fields.get("Processor") or None,
        "vendor": fields.get("vendor_id") or fields.get("CPU implementer") or None,
        "family": _int(fields.get("cpu family")),
        "model": _int(fields.get("model")),
        "stepping": _int(fields.get("stepping")),
        "microcode": fields.get("microcode") or None,
        "flags": None if present is None else {f: f in present for f in ISA_FLAGS},
    }


def _cgroup_cpu() -> tuple[str | None, float | None]:
    """(cpu.max as text, the quota in CPUs or None if unlimited/unreadable), cgroup v2 or v1."""
    raw = _read("/sys/fs/cgroup/cpu.max")
    if raw is None:
        quota = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        period = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if quota is None or period is None:
            return None, None
        quota = quota.strip()
        raw = f"{'max' if quota.startswith('-') else quota} {period.strip()}"
    parts = raw.split()
    if len(parts) != 2 or parts[0] == "max":
        return raw.strip(), None
    try:
        return raw.strip(), int(parts[0]) / int(parts[1])
    except (ValueError, ZeroDivisionError):
        return raw.strip(), None


def _mem_total_gib() -> float | None:
    """MemTotal of /proc/meminfo in GiB."""
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            try:
                return int(parts[1]) * (1024 if parts[-1] == "kB" else 1) / 2**30
            except (IndexError, ValueError):
                return None
    return None


def _round(x: float | None) -> float | None:
    """x to 2 decimals (None stays None)."""
    return None if x is None else round(x, 2)


def _version(name: str) -> str | None:
    """The installed version of a package (from the imported module if loaded; no import)."""
    from importlib import metadata

    version = getattr(sys.modules.get(name), "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:
        for dist in metadata.packages_distributions().get(name, ()):
            return metadata.version(dist)
    except Exception:  # pylint: disable=broad-except
        pass
    return None


def _jax_devices() -> dict[str, Any] | None:
    """Platform, count and (off CPU) kind of the devices JAX sees."""
    try:
        import jax

        devices = jax.devices()
    except Exception:  # pylint: disable=broad-except
        return None
    out: dict[str, Any] = {"platform": devices[0].platform, "device_count": len(devices)}
    if devices[0].platform != "cpu":
        out["device_kind"] = devices[0].device_kind
    return out


def _torch_threads(frameworks: Sequence[str]) -> tuple[int | None, int | None]:
    """torch's intra- and inter-op thread counts if torch is used (or already imported)."""
    if "torch" not in frameworks and "torch" not in sys.modules:
        return None, None
    try:
        import torch

        return torch.get_num_threads(), torch.get_num_interop_threads()
    except Exception:  # pylint: disable=broad-except
        return None, None


def machine_info(frameworks: Sequence[str] = ("jax",)) -> dict[str, Any]:
    """CPU, ISA flags, CPUs, memory, software versions and threads; None where unknown."""
    cpuinfo = _read("/proc/cpuinfo")
    cpu = parse_cpuinfo(cpuinfo or "")
    if cpu["model_name"] is None:
        cpu["model_name"] = platform.processor() or None
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    cgroup_raw, cgroup_cpus = _cgroup_cpu()
    packages = ["numpy"]
    for fw in frameworks:
        packages += [p for p in FRAMEWORK_PACKAGES.get(fw, (fw,)) if p not in packages]
    for group in FRAMEWORK_PACKAGES.values():
        packages += [p for p in group if p in sys.modules and p not in packages]
    intra, inter = _torch_threads(frameworks)
    return {
        "cpu": cpu,
        "cpus_visible": os.cpu_count(),
        "cpus_usable": usable,
        "cgroup_cpu_max": cgroup_raw,
        "cgroup_cpus": cgroup_cpus,
        "mem_total_gib": _round(_mem_total_gib()),
        "kernel": platform.release() or None,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in packages},
        "threads": {
            "torch_intra_op": intra,
            "torch_inter_op": inter,
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "env": {k: os.environ[k] for k in THREAD_ENV_VARS if k in os.environ},
        },
        "jax": _jax_devices() if "jax" in frameworks else None,
        "load_avg": load,
    }


def _cpu_ids(cpu: dict[str, Any]) -> str:
    """'family 25 model 17 stepping 1' (the parts that are known)."""
    parts = [f"{k} {cpu[k]}" for k in ("family", "model", "stepping") if cpu.get(k) is not None]
    return " ".join(parts) or "family/model unknown"


def _threads_text(info: dict[str, Any]) -> str:
    """The thread settings in one phrase."""
    t = info["threads"]
    parts = []
    if t.get("torch_intra_op") is not None:
        parts.append(f"torch {t['torch_intra_op']} intra-op/{t['torch_inter_op']} inter-op")
    parts += [f"{k}={v}" for k, v in t.get("env", {}).items()]
    if t.get("xla_flags"):
        parts.append(f"XLA_FLAGS={t['xla_flags']!r}")
    elif info.get("jax") is not None:
        parts.append("XLA_FLAGS unset")
    return ", ".join(parts) or "default"


def machine_description(info: dict[str, Any] | None = None) -> str:
    """One-line summary: accelerator, CPU model and ids, key ISA flags, CPUs, threads, load."""
    info = machine_info() if info is None else info
    cpu = info["cpu"]
    flags = cpu.get("flags")
    isa = "flags unknown" if flags is None else (
        " ".join(f for f in KEY_FLAGS if flags.get(f)) or "no avx2")
    text = (f"{cpu.get('model_name') or 'cpu'} ({_cpu_ids(cpu)}; {isa}), "
            f"{info['cpus_usable']}/{info['cpus_visible']} cpus usable/visible")
    if info.get("cgroup_cpus") is not None:
        text += f" (cgroup quota {info['cgroup_cpus']:g})"
    text += f", threads: {_threads_text(info)}"
    if info.get("load_avg"):
        text += f", load {info['load_avg'][0]:.2f}"
    dev = info.get("jax")
    if dev and dev["platform"] != "cpu":
        text = f"{dev.get('device_kind')} x{dev['device_count']} ({dev['platform']}); host {text}"
    return text


def machine_block(info: dict[str, Any]) -> str:
    """A multi-line human-readable description of the machine and software."""
    cpu = info["cpu"]
    flags = cpu.get("flags")
    ids = _cpu_ids(cpu)
    if cpu.get("microcode"):
        ids += f", microcode {cpu['microcode']}"
    if flags is None:
        isa = "unknown"
    else:
        absent = [f for f, v in flags.items() if not v]
        isa = " ".join(f for f, v in flags.items() if v) or "none of the listed"
        isa += f"; absent: {' '.join(absent)}" if absent else ""
    cgroup = info.get("cgroup_cpu_max")
    if cgroup is None:
        cgroup_text = "unreadable"
    elif info.get("cgroup_cpus") is None:
        cgroup_text = f"none ({cgroup})"
    else:
        cgroup_text = f"{info['cgroup_cpus']:g} cpus ({cgroup})"
    mem = info.get("mem_total_gib")
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in info["versions"].items())
    dev = info.get("jax")
    if dev is None:
        jax_text = "not used"
    else:
        jax_text = f"{dev['platform']} x{dev['device_count']}"
        if dev.get("device_kind"):
            jax_text += f" ({dev['device_kind']})"
    load = info.get("load_avg")
    rows = [
        ("cpu", f"{cpu.get('model_name') or 'unknown'} ({cpu.get('vendor') or 'vendor unknown'}, "
                f"{ids})"),
        ("isa", isa),
        ("cpus", f"{info['cpus_usable']} usable / {info['cpus_visible']} visible, "
                 f"cgroup quota {cgroup_text}"),
        ("memory", "unknown" if mem is None else f"{mem:.1f} GiB"),
        ("kernel", f"{info.get('kernel') or 'unknown'}, python {info.get('python')}"),
        ("versions", versions),
        ("threads", _threads_text(info)),
        ("jax", jax_text),
        ("load avg", "unknown" if load is None else " ".join(f"{x:.2f}" for x in load)
         + " (1/5/15 min)"),
    ]
    return "\n".join(["machine:"] + [f"  {k + ':':<10} {v}" for k, v in rows])


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
