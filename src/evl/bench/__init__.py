"""``evl bench``: where the time and memory of a configuration go, on this machine, as one JSON report.

Every figure is measured in a fresh process (so peak memory belongs to that measurement alone) with random
weights of the configured shapes: the training step with the backbone frozen and open, inference latency
and throughput, the backbone alone against this machine's fp32 matmul rate, feature extraction and a
training step on cached features read from a real memory-mapped cache (side by side, in alternating
rounds), and the training data loader. FLOPs are counted as
hardware does (two per multiply-add) for the achieved-GFLOP/s figures.

``config`` holds :class:`BenchConfig`, ``timing`` the clock and memory readings, ``measures`` the
measurements, ``isolated`` the process each runs in and ``report`` the report made of them.
"""

from __future__ import annotations

from evl.bench.config import BenchConfig
from evl.bench.isolated import run_isolated
from evl.bench.report import cached_epoch, run_bench

__all__ = ["BenchConfig", "cached_epoch", "run_bench", "run_isolated"]
