"""On-disk cache of decoded images.

Decoding thousands of JPEGs dominates start-up time, so file-based loaders
store the decoded ``uint8`` array as ``.npy`` plus a small JSON sidecar (file
names, which files failed to decode, the key material).  The key hashes the
absolute root path, the selected file names, their count / newest mtime /
total size and the image size: touching, adding or removing a file, or asking
for a different resolution, gives a new entry.

Location: the ``cache_dir`` argument, else ``$RELUCOMP_CACHE/data`` (the
variable names relucomp's cache root, shared with the model cache), else
``~/.cache/relucomp/data``.  ``RELUCOMP_CACHE=off`` (or ``cache_dir="off"``)
disables caching.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import decode as _decode

__all__ = ["default_cache_dir", "resolve_cache_dir", "decode_cached", "CACHE_VERSION"]

CACHE_VERSION = 1


def default_cache_dir() -> Path | None:
    from ..cache import cache_dir

    return cache_dir("data")


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    if cache_dir is None:
        return default_cache_dir()
    from ..cache import OFF_VALUES

    if isinstance(cache_dir, str) and cache_dir.strip().lower() in OFF_VALUES:
        return None
    return Path(cache_dir).expanduser()


def _cache_key(kind: str, root: Path, rel_files: Sequence[str], size: int) -> tuple[str, dict]:
    count, newest, total = _decode.file_signature(root, rel_files)
    names = hashlib.sha1("\n".join(rel_files).encode("utf-8", "surrogateescape")).hexdigest()
    material = {
        "version": CACHE_VERSION,
        "kind": kind,
        "root": str(Path(root).resolve()),
        "count": count,
        "newest_mtime_ns": newest,
        "total_bytes": total,
        "names_sha1": names,
        "image_size": int(size),
    }
    key = hashlib.sha1(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    return key, material


def _atomic_write_bytes(path: Path, writer) -> None:
    from ..atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            writer(f)

    atomic_write(path, write)


def decode_cached(
    kind: str,
    root: Path,
    rel_files: Sequence[str],
    size: int,
    cache_dir: Path | None,
    extra: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode ``root/rel_files`` at ``size`` through the cache.

    Returns ``(images N x 3 x size x size uint8, ok bool N, info)`` where
    ``info`` has ``cache`` (``"hit"``, ``"miss"`` or ``"off"``), ``seconds``
    and ``path`` (the ``.npy`` file, if any).  ``extra`` (labels/attributes)
    is stored in the JSON sidecar for humans; it is not part of the key.
    """
    t0 = time.perf_counter()
    rel_files = list(rel_files)
    npy = meta = None
    if cache_dir is not None:
        key, material = _cache_key(kind, root, rel_files, size)
        stem = f"{kind}-{size}px-{len(rel_files)}-{key}"
        npy = cache_dir / f"{stem}.npy"
        meta = cache_dir / f"{stem}.json"
        if npy.exists() and meta.exists():
            try:
                info = json.loads(meta.read_text())
                images = np.load(npy, allow_pickle=False)
                if (
                    info.get("key") == material
                    and images.shape == (len(rel_files), 3, size, size)
                    and images.dtype == np.uint8
                ):
                    ok = np.ones(len(rel_files), dtype=bool)
                    failed = set(info.get("failed", []))
                    if failed:
                        ok = np.array([f not in failed for f in rel_files], dtype=bool)
                    return images, ok, {"cache": "hit", "seconds": time.perf_counter() - t0, "path": str(npy)}
            except (OSError, ValueError, json.JSONDecodeError):
                pass  # unreadable entry: decode again and overwrite
    images, ok = _decode.decode_files([os.path.join(root, f) for f in rel_files], size)
    status = "off"
    if npy is not None and meta is not None:
        status = "miss"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(npy, lambda f: np.save(f, images, allow_pickle=False))
            sidecar = {
                "key": material,
                "files": rel_files,
                "failed": [f for f, good in zip(rel_files, ok) if not good],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if extra:
                sidecar["attributes"] = extra
            payload = json.dumps(sidecar).encode()
            _atomic_write_bytes(meta, lambda f: f.write(payload))
        except OSError as exc:
            warnings.warn(f"could not write the image cache in {cache_dir}: {exc}", stacklevel=3)
    return images, ok, {"cache": status, "seconds": time.perf_counter() - t0, "path": str(npy) if npy else None}
