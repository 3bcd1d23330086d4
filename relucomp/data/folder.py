"""Generic image folders.

Two layouts:

* **ImageFolder**: ``root/<class>/*.jpg`` or ``root/<split>/<class>/*.jpg``
  with split folders ``train`` plus ``test`` and/or ``val`` -- the official
  split is kept, a missing part is carved out of train.
* **CSV**: images plus a CSV (``folder:labels.csv``, or a folder with exactly
  one ``.csv``) with a file column (auto-detected: ``file``, ``filename``,
  ``path``, ``image``, ...), a target column and any attribute columns usable
  as fairness groups.  An optional ``split`` column (train/val/test) is used as
  the official split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import cache as _cache
from .base import Column, Source, warn
from .decode import is_image_name

__all__ = ["folder_source", "imagefolder_source", "csv_source", "FILE_COLUMNS", "SPLIT_DIRS"]

FILE_COLUMNS = ("file", "filename", "file_name", "filepath", "file_path", "path", "image", "image_path", "img", "image_file")
TARGET_COLUMNS = ("label", "labels", "class", "target", "y", "category")
SPLIT_DIRS = {"train": 0, "training": 0, "val": 1, "valid": 1, "validation": 1, "test": 2, "testing": 2}
_SPLIT_VALUES = {**SPLIT_DIRS, "dev": 1}
# integer columns with at most this many distinct values are treated as categories
MAX_INT_CATEGORIES = 50


def _images_under(d: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames.sort()
        for f in filenames:
            if is_image_name(f) and not f.startswith("."):
                out.append(os.path.join(dirpath, f))
    out.sort()
    return out


def _subdirs(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _split_dirs(root: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in _subdirs(root) if p.name.lower() in SPLIT_DIRS}


def has_split_layout(root: Path) -> bool:
    """True if every sub-folder is a split name (train/val/test...) and one is train."""
    subs = _subdirs(root)
    s = _split_dirs(root)
    return bool(subs) and len(s) == len(subs) and any(SPLIT_DIRS[k] == 0 for k in s)


def imagefolder_source(root: Path, name: str, cache_dir: Path | None) -> Source:
    """``root/<class>/*`` or ``root/<split>/<class>/*``."""
    split_dirs = _split_dirs(root)
    entries: list[tuple[str, str, int]] = []  # (relative file, class name, split code)
    if has_split_layout(root):
        for sname, sdir in sorted(split_dirs.items(), key=lambda kv: SPLIT_DIRS[kv[0]]):
            for cdir in _subdirs(sdir):
                for f in _images_under(cdir):
                    entries.append((os.path.relpath(f, root), cdir.name, SPLIT_DIRS[sname]))
        official = True
    else:
        for cdir in _subdirs(root):
            for f in _images_under(cdir):
                entries.append((os.path.relpath(f, root), cdir.name, 0))
        official = False
    if not entries:
        loose = [f for f in os.listdir(root) if is_image_name(f)] if root.is_dir() else []
        fix = (
            "put the images in one sub-folder per class (root/<class>/*.jpg or root/train|test/<class>/*.jpg), "
            "or add a CSV with a file column and a label column"
        )
        if loose:
            raise DataError(f"found {len(loose)} image(s) in {root} but no labels (no class sub-folders, no CSV)", fix)
        raise DataError(f"no images found in {root}", fix)
    class_names = sorted({c for _, c, _ in entries})
    code = {c: i for i, c in enumerate(class_names)}
    files = [e[0] for e in entries]
    labels = np.array([code[e[1]] for e in entries], dtype=np.int64)
    split = np.array([e[2] for e in entries], dtype=np.int64) if official else None

    def load(idx: np.ndarray, size: int):
        sel = [files[i] for i in idx]
        return _cache.decode_cached(name, root, sel, size, cache_dir, extra={"label": labels[idx].tolist()})

    return Source(
        name=name,
        columns={"label": Column(labels, class_names)},
        ids=files,
        load_images=load,
        split=split,
        default_target="label",
        default_groups=None,
        info={"layout": "imagefolder" + ("+split" if official else ""), "files": len(files)},
    )


def _find_csv(root: Path) -> Path | None:
    if root.is_file():
        return root if root.suffix.lower() in (".csv", ".tsv") else None
    csvs = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".tsv"))
    if len(csvs) > 1:
        preferred = [p for p in csvs if p.stem.lower() in ("labels", "metadata", "annotations", "index")]
        if len(preferred) == 1:
            return preferred[0]
        raise DataError(
            f"{root} has {len(csvs)} CSV files ({', '.join(p.name for p in csvs)}), cannot tell which holds the labels",
            f"give the CSV itself: folder:{csvs[0]}",
        )
    return csvs[0] if csvs else None


def _column_from_series(series) -> Column:
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        series = series.astype("object").map({True: "True", False: "False"})
    if pd.api.types.is_numeric_dtype(series):
        vals = series.to_numpy(dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        uniq = np.unique(finite)
        if len(uniq) and np.all(uniq == np.round(uniq)) and len(uniq) <= MAX_INT_CATEGORIES:
            codes = np.full(len(vals), -1, dtype=np.int64)
            ok = np.isfinite(vals)
            codes[ok] = np.searchsorted(uniq, vals[ok])
            return Column(codes, [str(int(u)) for u in uniq])
        return Column(vals, None)
    strings = series.astype("object")
    missing = strings.isna().to_numpy() | (strings.astype(str).str.strip() == "").to_numpy()
    as_str = strings.astype(str).str.strip().to_numpy()
    names = sorted({s for s, m in zip(as_str, missing) if not m})
    code = {n: i for i, n in enumerate(names)}
    codes = np.array([-1 if m else code[s] for s, m in zip(as_str, missing)], dtype=np.int64)
    return Column(codes, names)


def csv_source(csv_path: Path, name: str, cache_dir: Path | None) -> Source:
    import pandas as pd

    sep = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    try:
        df = pd.read_csv(csv_path, sep=sep)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {csv_path}: {exc}", "give a comma-separated file with a header row") from exc
    lower = {c.strip().lower(): c for c in df.columns}
    file_col = next((lower[c] for c in FILE_COLUMNS if c in lower), None)
    if file_col is None:
        raise DataError(
            f"{csv_path.name} has no file column (columns: {', '.join(map(str, df.columns))})",
            f"name the column holding image paths one of: {', '.join(FILE_COLUMNS)}",
        )
    root = csv_path.parent
    rel_files: list[str] = []
    missing: list[str] = []
    keep_rows: list[int] = []
    for i, v in enumerate(df[file_col].tolist()):
        if not isinstance(v, str) or not v.strip():
            missing.append(str(v))
            continue
        p = Path(v.strip())
        full = p if p.is_absolute() else root / p
        if not full.is_file():
            missing.append(v)
            continue
        rel_files.append(os.path.relpath(full, root))
        keep_rows.append(i)
    if missing:
        warn(
            f"skipped {len(missing)} row(s) of {csv_path.name} whose image file does not exist: "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
        )
    if not rel_files:
        raise DataError(
            f"no images found: none of the {len(df)} file(s) listed in {csv_path.name} exist",
            f"paths in column {file_col!r} must be relative to {root} or absolute",
        )
    df = df.iloc[keep_rows].reset_index(drop=True)
    columns: dict[str, Column] = {}
    split = None
    for c in df.columns:
        if c == file_col:
            continue
        key = str(c).strip()
        if key.lower() == "split":
            vals = df[c].astype(str).str.strip().str.lower()
            if vals.isin(list(_SPLIT_VALUES)).all():
                split = vals.map(_SPLIT_VALUES).to_numpy(dtype=np.int64)
                continue
        columns[key] = _column_from_series(df[c])
    if split is not None and not (split == 0).any():
        split = None  # a split column without train rows is useless as a split
    lower_cols = {k.lower(): k for k in columns}
    default_target = next((lower_cols[t] for t in TARGET_COLUMNS if t in lower_cols), None)
    if default_target is None and len(columns) == 1:
        default_target = next(iter(columns))

    def load(idx: np.ndarray, size: int):
        sel = [rel_files[i] for i in idx]
        return _cache.decode_cached(name, root, sel, size, cache_dir)

    return Source(
        name=name,
        columns=columns,
        ids=rel_files,
        load_images=load,
        split=split,
        default_target=default_target or "",
        default_groups=None,
        info={"layout": "csv", "csv": str(csv_path), "file_column": str(file_col), "files": len(rel_files), "missing_files": len(missing)},
    )


def folder_source(root: Path, cache_dir: Path | None, name: str = "folder") -> Source:
    csv = _find_csv(root)
    if csv is not None:
        return csv_source(csv, name, cache_dir)
    if root.is_file():
        raise DataError(f"{root} is a file, not a folder or CSV", "give folder:DIR or folder:labels.csv")
    return imagefolder_source(root, name, cache_dir)
