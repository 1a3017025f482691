"""Resident memory of the current process, for the per-step figures each learner and sampler reports.

`resident_memory()` gives the process's resident set now and its peak since the last `reset_peak=True` (Linux
keeps the peak in /proc/self/status and resets it through /proc/self/clear_refs); elsewhere the peak is the
process's lifetime peak. Resident memory counts what the allocator keeps as well as live tensors: that is what
the machine has to hold.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import psutil

GIB = 2**30


def resident_memory(*, reset_peak: bool = False) -> dict[str, float]:
    """{"rss_gib": resident now, "peak_gib": peak since the last reset}; `reset_peak` starts a new peak after."""
    rss = psutil.Process().memory_info().rss
    status = Path("/proc/self/status")
    if status.exists():
        peak_kib = next(int(line.split()[1]) for line in status.read_text().splitlines()
                        if line.startswith("VmHWM:"))
        peak = peak_kib * 1024
        if reset_peak:
            Path("/proc/self/clear_refs").write_text("5")
    else:  # macOS reports ru_maxrss in bytes, and it cannot be reset
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"rss_gib": rss / GIB, "peak_gib": max(peak, rss) / GIB}
