"""The traffic shapes and latency figures that rl-serve's load benchmarks (serve_load.py, turns.py) share."""

from __future__ import annotations

import statistics

SMALL_DATUMS, SMALL_TOKENS, BIG_DATUM_TOKENS = 4, 64, 512
"""A small user's step: forward_backward on 4 datums of 64 tokens; a large batch: datums of 512 tokens."""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def latency(values: list[float]) -> dict[str, float]:
    return {"p50_s": round(statistics.median(values), 3), "p95_s": round(percentile(values, 0.95), 3),
            "steps": len(values)}
