"""Benchmark: decoding throughput of the real UTKFace set, first run vs cached.

    python benchmarks/bench_data.py [--utkface PATH] [--image-size 32] [--out benchmarks/results/data.json]

The first run uses a fresh temporary cache directory, so every JPEG is decoded
(PIL draft mode + thread pool); the second run reads the ``.npy`` cache.  The
OS file cache is not dropped: if the JPEGs were read recently the first run
measures decoding, not disk reads.  Writes a JSON with images/s, timings and
the race group counts.  Skips (exit 0, with a message) if the folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_UTKFACE = REPO.parent / "shared" / "data" / "utkface" / "UTKFace"


def _run(spec: str, image_size: int, cache_dir: Path) -> tuple[object, float, list[str]]:
    from relucomp.data import load_data

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        bundle = load_data(spec, image_size=image_size, cache_dir=cache_dir)
        wall = time.perf_counter() - t0
    return bundle, wall, [str(w.message) for w in rec]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utkface", type=Path, default=DEFAULT_UTKFACE, help=f"UTKFace folder (default {DEFAULT_UTKFACE})")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data.json")
    args = ap.parse_args(argv)

    if not args.utkface.is_dir():
        print(f"skip: UTKFace folder {args.utkface} not found (pass --utkface PATH)")
        return 0

    import PIL
    import PIL.features
    import torch

    spec = f"utkface:{args.utkface}"
    with tempfile.TemporaryDirectory(prefix="relucomp-bench-cache-") as tmp:
        cache = Path(tmp)
        first, first_wall, first_warnings = _run(spec, args.image_size, cache)
        cached, cached_wall, _ = _run(spec, args.image_size, cache)
        cache_bytes = sum(p.stat().st_size for p in cache.iterdir())

    n = int(first.info["used"])
    assert first.info["cache"] == "miss" and cached.info["cache"] == "hit", (first.info["cache"], cached.info["cache"])
    assert torch.equal(first.train.images, cached.train.images)
    summary = first.summary()
    race_counts = {
        g: sum(summary["splits"][s]["groups"][g] for s in ("train", "val", "test")) for g in first.group_names
    }
    dec_first = float(first.info["load_seconds"])
    dec_cached = float(cached.info["load_seconds"])
    result = {
        "benchmark": "utkface decode throughput",
        "path": str(args.utkface),
        "image_size": args.image_size,
        "files_listed": first.info["source"]["files"],
        "malformed_names": first.info["source"]["malformed_names"],
        "decode_failed": first.info["decode_failed"],
        "images": n,
        "first_run": {
            "decode_seconds": round(dec_first, 3),
            "decode_images_per_s": round(n / dec_first, 1),
            "load_data_seconds": round(first_wall, 3),
            "load_data_images_per_s": round(n / first_wall, 1),
        },
        "cached_run": {
            "cache_read_seconds": round(dec_cached, 3),
            "cache_read_images_per_s": round(n / dec_cached, 1),
            "load_data_seconds": round(cached_wall, 3),
            "load_data_images_per_s": round(n / cached_wall, 1),
        },
        "speedup_load_data": round(first_wall / cached_wall, 2),
        "cache_bytes": cache_bytes,
        "race_counts": race_counts,
        "split_sizes": {s: summary["splits"][s]["n"] for s in ("train", "val", "test")},
        "target": first.target,
        "class_names": first.class_names,
        "mean": summary["mean"],
        "std": summary["std"],
        "warnings": first_warnings,
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": PIL.__version__,
            "libjpeg_turbo": bool(PIL.features.check_feature("libjpeg_turbo")),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "machine": platform.machine(),
            "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "note": "OS page cache not dropped between runs",
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"UTKFace {n} images at {args.image_size}px: first run decode {n / dec_first:,.0f} img/s "
        f"(load_data {first_wall:.2f}s), cached {n / dec_cached:,.0f} img/s (load_data {cached_wall:.2f}s)"
    )
    print(f"race counts: {race_counts}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
