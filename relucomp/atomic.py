"""The one atomic-write helper: write to a temporary file beside the target, then ``os.replace``.

Readers never see a half-written file, a failure leaves nothing behind, and
the final file gets the usual mode for a new file (``0666 & ~umask``, e.g.
``0644``) rather than the ``0600`` of :func:`tempfile.mkstemp`, so the services
that load ``model.onnx`` / ``report.json`` can read them.  Used for every
artifact relucomp writes: model.onnx, model.pt, report.json, config.toml,
checkpoints, sweep state and caches.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "default_mode"]


def default_mode() -> int:
    """``0o666`` minus the process umask (what ``open(path, "w")`` would give a new file)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike[str], writer: Callable[[str], Any] | bytes | str) -> Path:
    """Write ``path`` atomically.  ``writer`` is bytes, text, or ``writer(tmp_path)`` that writes the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if isinstance(writer, bytes):
            Path(tmp).write_bytes(writer)
        elif isinstance(writer, str):
            Path(tmp).write_text(writer, encoding="utf-8")
        else:
            writer(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, text)


def _json_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)


def atomic_write_json(path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, default=_json_default))


def atomic_torch_save(path, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
