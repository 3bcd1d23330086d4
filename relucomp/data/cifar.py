"""CIFAR-10 / CIFAR-100 from the python pickle batches, or from a JPEG ImageFolder.

Pickle layout (as downloaded): ``data_batch_1..5``, ``test_batch``,
``batches.meta`` (CIFAR-10) or ``train``, ``test``, ``meta`` (CIFAR-100, with
``fine_labels`` and ``coarse_labels``).  The folder given may also be the
parent of ``cifar-10-batches-py`` / ``cifar-100-python``.  A folder with
``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` is read as an ImageFolder.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .base import Column, Source
from .folder import has_split_layout, imagefolder_source
from .transforms import resize_uint8

__all__ = ["cifar_source", "find_cifar_pickles", "read_pickle"]

_SUBDIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


#: everything a CIFAR python batch needs (numpy arrays; lists, dicts, bytes, numbers are pickle opcodes)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "bytes"), ("builtins", "str"),
    ("builtins", "int"), ("builtins", "float"),
    ("_codecs", "encode"),  # how python 3 writes bytes in a protocol-2 pickle: encode(str, "latin1")
    ("__builtin__", "list"), ("__builtin__", "dict"), ("__builtin__", "str"), ("__builtin__", "int"),
    ("__builtin__", "float"),
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and plain containers — and nothing else.

    A pickle can name any importable callable (``os.system``...) and have it
    called while loading; a CIFAR batch from a user path is untrusted, so every
    global outside :data:`_ALLOWED` is refused with a :class:`DataError`.
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR batch: the file is not a plain CIFAR "
                            "pickle (it names code to run)",
                            "use the official CIFAR python batches, or convert the data to a JPEG "
                            "train/<class>/ test/<class>/ folder")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            import codecs

            def encode(obj, encoding="latin1", errors="strict"):  # only text codecs, never e.g. a "zlib" bomb
                if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8", "ascii"):
                    raise DataError(f"refusing codec {encoding!r} in a CIFAR batch",
                                    "use the official CIFAR python batches")
                return codecs.encode(obj, encoding, errors)

            return encode
        import builtins

        return getattr(builtins, name)


def read_pickle(path: Path) -> dict[str, Any]:
    """Load a CIFAR pickle with a restricted unpickler; keys are returned as ``str``."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except DataError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"cannot read CIFAR batch {path}: {exc}", "re-download the python version of CIFAR") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch (expected a dict)", "re-download the python version of CIFAR")
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def find_cifar_pickles(root: Path) -> tuple[str, Path] | None:
    """``("cifar10" | "cifar100", folder)`` if ``root`` (or a known sub-folder) holds the pickles."""
    for cand in [root, root / _SUBDIRS["cifar10"], root / _SUBDIRS["cifar100"]]:
        if (cand / "data_batch_1").is_file():
            return "cifar10", cand
        if (cand / "train").is_file() and (cand / "meta").is_file():
            return "cifar100", cand
    return None


def _images(batch: dict[str, Any], path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim == 2 and data.shape[1] == 3072:
        data = data.reshape(-1, 3, 32, 32)
    if data.ndim != 4 or data.shape[1:] != (3, 32, 32):
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected N x 3072", "re-download CIFAR (python version)")
    return data.astype(np.uint8, copy=False)


def _pickle_source(kind: str, folder: Path) -> Source:
    parts: list[tuple[str, Path]]
    if kind == "cifar10":
        train_files = sorted(folder.glob("data_batch_*"), key=lambda p: p.name)
        parts = [("train", p) for p in train_files]
        if (folder / "test_batch").is_file():
            parts.append(("test", folder / "test_batch"))
        meta_path = folder / "batches.meta"
    else:
        parts = [("train", folder / "train")]
        if (folder / "test").is_file():
            parts.append(("test", folder / "test"))
        meta_path = folder / "meta"
    images, fine, coarse, split, ids = [], [], [], [], []
    seen = {"train": 0, "test": 0}
    for sname, p in parts:
        batch = read_pickle(p)
        x = _images(batch, p)
        if kind == "cifar10":
            lab = batch.get("labels", batch.get("fine_labels"))
        else:
            lab = batch.get("fine_labels")
            c = batch.get("coarse_labels")
            if c is None:
                raise DataError(f"{p} has no coarse_labels", "this does not look like CIFAR-100")
            coarse.append(np.asarray(c, dtype=np.int64))
        if lab is None:
            raise DataError(f"{p} has no labels", f"this does not look like {kind.upper()} (keys: {sorted(batch)})")
        lab = np.asarray(lab, dtype=np.int64)
        if len(lab) != len(x):
            raise DataError(f"{p}: {len(x)} images but {len(lab)} labels", "re-download CIFAR (python version)")
        ids.extend(f"{sname}/{seen[sname] + i}" for i in range(len(x)))
        seen[sname] += len(x)
        images.append(x)
        fine.append(lab)
        split.append(np.full(len(x), 0 if sname == "train" else 2, dtype=np.int64))
    all_images = np.concatenate(images)
    labels = np.concatenate(fine)
    meta = read_pickle(meta_path) if meta_path.is_file() else {}
    if kind == "cifar10":
        names = _names(meta.get("label_names", [])) or [str(i) for i in range(int(labels.max()) + 1)]
        columns = {"label": Column(labels, names)}
    else:
        fine_names = _names(meta.get("fine_label_names", [])) or [str(i) for i in range(100)]
        coarse_labels = np.concatenate(coarse)
        coarse_names = _names(meta.get("coarse_label_names", [])) or [str(i) for i in range(20)]
        columns = {
            "label": Column(labels, fine_names),
            "fine": Column(labels, fine_names),
            "coarse": Column(coarse_labels, coarse_names),
        }
    split_a = np.concatenate(split)
    has_test = bool((split_a == 2).any())

    def load(idx: np.ndarray, size: int):
        return resize_uint8(all_images[idx], size), np.ones(len(idx), dtype=bool), {"cache": "none", "seconds": 0.0}

    return Source(
        name=kind,
        columns=columns,
        ids=ids,
        load_images=load,
        split=split_a if has_test else None,
        default_target="label",
        default_groups=None,
        info={"layout": "pickle", "folder": str(folder)},
    )


def cifar_source(kind: str, root: Path, cache_dir: Path | None) -> Source:
    found = find_cifar_pickles(root)
    if found is not None:
        found_kind, folder = found
        if found_kind != kind:
            raise DataError(
                f"{root} holds {found_kind.upper()} batches but the spec says {kind}",
                f"use {found_kind}:{root}",
            )
        return _pickle_source(kind, folder)
    if root.is_dir() and has_split_layout(root):
        return imagefolder_source(root, kind, cache_dir)
    expected = (
        "data_batch_1..5, test_batch, batches.meta" if kind == "cifar10" else "train, test, meta"
    )
    raise DataError(
        f"no {kind.upper()} data found in {root}",
        f"give the folder with the python batches ({expected}) or a JPEG folder with train/<class>/ and test/<class>/",
    )
