"""The one cache root.

``$RELUCOMP_CACHE`` if set, else ``~/.cache/relucomp``.  ``RELUCOMP_CACHE=off``
(also ``0``, ``none``, ``false``, ``no``, ``disabled``) turns caching off:
:func:`cache_root` returns ``None`` and nothing is cached (pretrained models
are retrained, data is decoded again) — it never writes to a folder named
``off``.  Sub-folders: ``models/`` (pretrained dense models), ``data/``
(decoded arrays), ``pi-venv/`` (the SPU environment of ``pi-bench``).
"""

from __future__ import annotations

import os
from pathlib import Path

OFF_VALUES = ("off", "0", "none", "false", "no", "disabled")

__all__ = ["cache_root", "cache_dir", "caching_enabled", "OFF_VALUES"]


def caching_enabled() -> bool:
    return os.environ.get("RELUCOMP_CACHE", "").strip().lower() not in OFF_VALUES


def cache_root() -> Path | None:
    """The cache root, or ``None`` when caching is turned off."""
    env = os.environ.get("RELUCOMP_CACHE")
    if env is not None and env.strip().lower() in OFF_VALUES:
        return None
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "relucomp"


def cache_dir(kind: str) -> Path | None:
    """``cache_root()/kind`` (``models``, ``data``, ``pi-venv``), or ``None`` when caching is off."""
    root = cache_root()
    return None if root is None else root / kind
