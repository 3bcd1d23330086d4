"""Interleaved onnxruntime latency: the one implementation the benchmarks share.

Several ONNX models are timed side by side: every repeat runs **all of them once,
in a fresh random order**, so load from other jobs hits them alike; the result
is the median and IQR over repeats.  A batch-1 sample is the mean of ``inner``
back-to-back runs (timer resolution).

Thread-pool spinning is **off** in every session (``session.intra_op.allow_spinning
= 0``).  With it on (onnxruntime's default), the idle worker threads of the
session that just ran keep spinning while the next session runs, so sessions of
an interleaved measurement steal each other's cores: on a 2-core machine, 2-thread
sessions measured 3.3× slower at batch 64 (27.3 vs 8.2 ms for resnet8) and up to
2.6× more spread out at batch 1.  A deployment runs one session, where spinning
only helps latency, so timings with spinning off are upper bounds for every
variant alike and their ratios are what compares the models.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

SPINNING_KEY = "session.intra_op.allow_spinning"


def ort_session(path: str | Path, *, threads: int, spinning: bool = False):
    """A CPU onnxruntime session with ``threads`` intra-op threads, one inter-op thread, default
    graph optimizations (ORT_ENABLE_ALL: fusions and the NCHWc layout), spinning off unless asked."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry(SPINNING_KEY, "1" if spinning else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_stats(samples_s: Sequence[float]) -> dict:
    """Median, IQR, min and n of latency samples given in seconds (reported in ms)."""
    q1, med, q3 = np.percentile(samples_s, [25, 50, 75])
    return {"median_ms": round(float(med) * 1e3, 4), "iqr_ms": [round(float(q1) * 1e3, 4), round(float(q3) * 1e3, 4)],
            "min_ms": round(float(min(samples_s)) * 1e3, 4), "n": len(samples_s)}


def interleaved_latency(paths: Mapping[str, str | Path], *, threads: int, batch: int, repeats: int,
                        inner: int = 1, shape: Sequence[int] = (3, 32, 32), seed: int = 0, warmup: int = 3,
                        spinning: bool = False) -> dict:
    """Time every model of ``paths`` (name → ONNX file) interleaved; see the module docstring.

    Returns ``{"variants": {name: latency_stats}, "loadavg_before", "loadavg_after", "spinning"}``.
    """
    if not paths:
        raise ValueError("interleaved_latency needs at least one model")
    if repeats < 1 or inner < 1 or batch < 1 or threads < 1:
        raise ValueError("repeats, inner, batch and threads must be >= 1")
    sess = {k: ort_session(p, threads=threads, spinning=spinning) for k, p in paths.items()}
    x = np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sess.items()}
    for k, s in sess.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    samples: dict[str, list[float]] = {k: [] for k in sess}
    order = list(sess)
    rng = random.Random(seed)
    load0 = os.getloadavg()
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            s, f = sess[k], feeds[k]
            t0 = time.perf_counter()
            for _ in range(inner):
                s.run(None, f)
            samples[k].append((time.perf_counter() - t0) / inner)
    return {"variants": {k: latency_stats(v) for k, v in samples.items()}, "loadavg_before": list(load0),
            "loadavg_after": list(os.getloadavg()), "spinning": spinning}
