"""``load_data``: one call from a data spec to stratified, normalised train/val/test splits."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from . import cache as _cache
from .base import Column, DataBundle, GroupedDataset, Source, warn
from .splits import strata_of, stratified_split, stratified_subsample
from .synthetic import CLASS_NAMES as SYN_CLASSES
from .synthetic import DEFAULT_SIZE as SYN_SIZE
from .synthetic import GROUP_NAMES as SYN_GROUPS
from .synthetic import make_synthetic, synthetic_labels
from .transforms import channel_stats
from .utkface import AGE_BINS

__all__ = ["DATA_KINDS", "parse_data_spec", "load_data", "load_source", "detect_kind"]

DATA_KINDS = ("synthetic", "utkface", "cifar10", "cifar100", "svhn", "folder")
_ALIASES = {
    "synthetic": "synthetic",
    "synth": "synthetic",
    "utkface": "utkface",
    "utk": "utkface",
    "cifar10": "cifar10",
    "cifar": "cifar10",
    "cifar100": "cifar100",
    "svhn": "svhn",
    "folder": "folder",
    "imagefolder": "folder",
    "csv": "folder",
}
_SPEC_HELP = "use synthetic, utkface:PATH, cifar10:PATH, cifar100:PATH, svhn:PATH or folder:PATH"
_PATH_HINT = {
    "utkface": "utkface:/path/to/UTKFace",
    "cifar10": "cifar10:/path/to/cifar-10-batches-py",
    "cifar100": "cifar100:/path/to/cifar-100-python",
    "svhn": "svhn:/path/to/folder-with-train_32x32.mat",
    "folder": "folder:/path/to/images (class sub-folders or a CSV)",
}
_CIFAR10_CLASSES = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
_NO_GROUPS = {"", "none", "all", "null", "no", "off"}
# the limit subset is the same for every split seed, so seeds can be swept on one subset
LIMIT_SEED = 0


def detect_kind(path: Path) -> str:
    """Guess the kind of a bare path (used when a spec has no ``kind:`` prefix)."""
    from .cifar import find_cifar_pickles
    from .utkface import looks_like_utkface

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".mat":
            return "svhn"
        return "folder"
    found = find_cifar_pickles(path)
    if found is not None:
        return found[0]
    if (path / "train_32x32.mat").is_file():
        return "svhn"
    if looks_like_utkface(path):
        return "utkface"
    from .folder import has_split_layout

    if has_split_layout(path):
        train = next(p for p in path.iterdir() if p.is_dir() and p.name.lower() in ("train", "training"))
        if {p.name for p in train.iterdir() if p.is_dir()} == _CIFAR10_CLASSES:
            return "cifar10"
    return "folder"


def parse_data_spec(spec: str | os.PathLike[str]) -> tuple[str, Path | None]:
    """``"utkface:/data/UTKFace"`` -> ``("utkface", Path("/data/UTKFace"))``.

    Kinds: ``synthetic`` (no path), ``utkface``, ``cifar10``, ``cifar100``,
    ``svhn``, ``folder`` (aliases: ``cifar``, ``utk``, ``imagefolder``,
    ``csv``).  A bare existing path is accepted and its kind detected.  The
    path is not checked here beyond that; :func:`load_data` checks it.
    """
    if isinstance(spec, os.PathLike):
        p = Path(spec).expanduser()
        if not p.exists():
            raise DataError(f"data path {p} does not exist", _SPEC_HELP)
        return detect_kind(p), p
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}", _SPEC_HELP)
    s = spec.strip()
    head, sep, rest = s.partition(":")
    kind = _ALIASES.get(head.strip().lower().replace("-", "").replace("_", ""))
    if kind is not None:
        rest = rest.strip()
        if kind == "synthetic":
            if rest:
                raise DataError(f"synthetic takes no path (got {spec!r})", "use --data synthetic (size via --limit)")
            return "synthetic", None
        if not rest:
            raise DataError(f"data spec {spec!r} needs a path", f"use {_PATH_HINT[kind]}")
        return kind, Path(rest).expanduser()
    p = Path(s).expanduser()
    if p.exists():
        return detect_kind(p), p
    if sep and "/" not in head and "\\" not in head and head.strip():
        raise DataError(f"unknown data spec kind {head.strip()!r}", _SPEC_HELP)
    raise DataError(f"unknown data spec {spec!r}: not a known kind and no such path", _SPEC_HELP)


# ---------------------------------------------------------------- sources
def _synthetic_source(n: int) -> Source:
    labels, groups = synthetic_labels(n)
    generated: dict[int, np.ndarray] = {}

    def load(idx: np.ndarray, size: int):
        t0 = time.perf_counter()
        if size not in generated:
            generated[size] = make_synthetic(n, size)[0]
        return generated[size][idx], np.ones(len(idx), dtype=bool), {"cache": "none", "seconds": time.perf_counter() - t0}

    return Source(
        name="synthetic",
        columns={"label": Column(labels, list(SYN_CLASSES)), "group": Column(groups, list(SYN_GROUPS))},
        ids=[str(i) for i in range(n)],
        load_images=load,
        default_target="label",
        default_groups="group",
        presized=True,
        info={"generated": n},
    )


def load_source(kind: str, path: Path | None, cache_dir: Path | None, limit: int | None = None) -> Source:
    """Metadata of one data set (no pixels yet)."""
    if kind == "synthetic":
        return _synthetic_source(limit or SYN_SIZE)
    assert path is not None
    if not path.exists():
        raise DataError(f"data path {path} does not exist", f"check the path; expected {_PATH_HINT[kind]}")
    if kind == "utkface":
        from .utkface import utkface_source

        if not path.is_dir():
            raise DataError(f"{path} is not a folder", _PATH_HINT["utkface"])
        return utkface_source(path, cache_dir)
    if kind in ("cifar10", "cifar100"):
        from .cifar import cifar_source

        return cifar_source(kind, path if path.is_dir() else path.parent, cache_dir)
    if kind == "svhn":
        from .svhn import svhn_source

        return svhn_source(path)
    if kind == "folder":
        from .folder import folder_source

        return folder_source(path, cache_dir)
    raise DataError(f"unknown data spec kind {kind!r}", _SPEC_HELP)


# ---------------------------------------------------------------- columns
_THRESHOLD = re.compile(r"^(?P<col>.+?)\s*>=\s*(?P<n>-?\d+(?:\.\d+)?)$")
_BINS = re.compile(r"^(?P<col>.+?)[-_ ]bins?$", re.IGNORECASE)


def _numeric(col: Column) -> np.ndarray | None:
    """Float values of a numeric column, or of a categorical one whose names are all numbers."""
    if not col.categorical:
        return col.values.astype(np.float64)
    try:
        nums = np.array([float(n) for n in col.names or []], dtype=np.float64)
    except ValueError:
        return None
    out = np.full(len(col.values), np.nan)
    ok = col.values >= 0
    out[ok] = nums[col.values[ok]]
    return out


def _available(source: Source) -> list[str]:
    out = []
    for name, col in source.columns.items():
        if col.categorical:
            out.append(name)
    for name, col in source.columns.items():
        if _numeric(col) is not None:
            if name.lower() == "age":
                out.append(f"{name}-bin")
            out.append(f"{name}>=N")
    return out


def _lookup(source: Source, name: str) -> tuple[str, Column] | None:
    lower = {k.lower(): k for k in source.columns}
    key = lower.get(name.strip().lower())
    return (key, source.columns[key]) if key is not None else None


def _fmt_num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _categorical_error(source: Source, name: str, col: Column, spec: str, flag: str, avail: str) -> DataError:
    shown = ", ".join(repr(n) for n in (col.names or [])[:4]) + (", ..." if len(col.names or []) > 4 else "")
    return DataError(
        f"{flag} {spec!r}: column {name!r} of {source.name} holds categories ({shown}), not numbers, "
        "so it cannot be thresholded or binned",
        f"use {flag} {name} to take its categories as they are (available: {avail})",
    )


def resolve_column(source: Source, spec: str, flag: str) -> tuple[np.ndarray, list[str], str]:
    """``(codes with -1 for missing, names, canonical spec)`` for a target/group spec."""
    spec = spec.strip()
    avail = ", ".join(_available(source))
    found = _lookup(source, spec)
    if found is not None:
        name, col = found
        if col.categorical:
            return col.values.astype(np.int64), list(col.names or []), name
        raise DataError(
            f"{flag} {name!r} of {source.name} is numeric, not a set of categories",
            f"bin it: {name}>=N" + (f" or {name}-bin" if name.lower() == "age" else "") + f" (available: {avail})",
        )
    m = _THRESHOLD.match(spec)
    if m:
        found = _lookup(source, m["col"])
        vals = _numeric(found[1]) if found else None
        if found is not None and vals is None:
            raise _categorical_error(source, found[0], found[1], spec, flag, avail)
        if found is None:
            raise DataError(f"unknown {flag} column {m['col']!r} for {source.name}", f"choose one of: {avail}")
        thr = float(m["n"])
        codes = np.where(np.isnan(vals), -1, (vals >= thr).astype(np.int64)).astype(np.int64)
        t = _fmt_num(thr)
        return codes, [f"{found[0]}<{t}", f"{found[0]}>={t}"], f"{found[0]}>={t}"
    m = _BINS.match(spec)
    if m:
        found = _lookup(source, m["col"])
        vals = _numeric(found[1]) if found else None
        if found is not None and vals is None:
            raise _categorical_error(source, found[0], found[1], spec, flag, avail)
        if found is None or found[0].lower() != "age":
            raise DataError(f"unknown {flag} {spec!r} for {source.name} (only age can be binned)", f"choose one of: {avail}")
        codes = np.full(len(vals), -1, dtype=np.int64)
        for i, (lo, hi, _) in enumerate(AGE_BINS):
            codes[(vals >= lo) & (vals <= hi + 0.999)] = i
        return codes, [b[2] for b in AGE_BINS], f"{found[0]}-bin"
    raise DataError(f"unknown {flag} {spec!r} for {source.name}", f"choose one of: {avail}")


def _resolve_groups(source: Source, fair_groups: str | None) -> tuple[np.ndarray, list[str], str | None]:
    spec = source.default_groups if fair_groups is None else fair_groups
    if spec is None or spec.strip().lower() in _NO_GROUPS:
        return np.zeros(len(source), dtype=np.int64), ["all"], None
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    codes = np.zeros(len(source), dtype=np.int64)
    names = [""]
    canon = []
    missing = np.zeros(len(source), dtype=bool)
    for part in parts:
        c, n, cn = resolve_column(source, part, "--fair-groups")
        missing |= c < 0
        codes = codes * len(n) + np.maximum(c, 0)
        names = [f"{a}/{b}" if a else b for a in names for b in n]
        canon.append(cn)
    codes[missing] = -1
    return codes, names, ",".join(canon)


# ---------------------------------------------------------------- load_data
def _check_args(image_size, val_fraction, test_fraction, limit, min_group_test) -> None:
    if not isinstance(image_size, (int, np.integer)) or not 4 <= int(image_size) <= 1024:
        raise DataError(f"image size {image_size!r} is not an integer in 4..1024", "use e.g. --image-size 32")
    for label, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(v) < 1.0:
            raise DataError(f"{label}={v} is not in [0, 1)", "use e.g. val_fraction=0.1, test_fraction=0.2")
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction = {float(val_fraction) + float(test_fraction):g} leaves no training data",
            "keep val_fraction + test_fraction below 1",
        )
    if limit is not None and (not isinstance(limit, (int, np.integer)) or int(limit) < 1):
        raise DataError(f"limit={limit!r} is not a positive integer", "use e.g. --limit 2000, or omit it")
    if int(min_group_test) < 0:
        raise DataError(f"min_group_test={min_group_test} is negative", "use a count >= 0")


def load_data(
    spec: str | os.PathLike[str] = "synthetic",
    *,
    target: str | None = None,
    fair_groups: str | None = None,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    min_group_test: int = 20,
) -> DataBundle:
    """Load a data set and split it into stratified train / val / test.

    ``target`` picks the label (default per data set: ``label``; UTKFace
    ``gender``; also ``race``, ``age-bin``, ``age>=N`` or any CSV column).
    ``fair_groups`` picks the group attribute(s), comma-separated for
    intersections (``race,gender`` -> ``White/Male``, ...); ``None`` = the
    data set's default (synthetic ``group``, UTKFace ``race``, otherwise a
    single group ``all``); ``"none"`` forces a single group.

    Without an official split, ``test_fraction`` / ``val_fraction`` of the
    samples go to test / val, stratified by (label, group) with ``seed``.
    With one (CIFAR, SVHN, split folders) the test set is kept and
    ``val_fraction`` of the official train set becomes val.  ``limit`` caps
    the number of images (stratified, same subset for every seed; for
    ``synthetic`` it is the generated size, default 6000).
    """
    t0 = time.perf_counter()
    _check_args(image_size, val_fraction, test_fraction, limit, min_group_test)
    image_size = int(image_size)
    kind, path = parse_data_spec(spec)
    cache = _cache.resolve_cache_dir(cache_dir)
    source = load_source(kind, path, cache, limit=limit)
    n_all = len(source)

    target_spec = target if target is not None else source.default_target
    if not target_spec:
        raise DataError(
            f"cannot tell which column of {source.name} is the label",
            f"pass --target COLUMN (one of: {', '.join(_available(source))})",
        )
    y, class_names, target_name = resolve_column(source, target_spec, "--target")
    g, group_names, group_attr = _resolve_groups(source, fair_groups)

    valid = (y >= 0) & (g >= 0)
    dropped = int((~valid).sum())
    if dropped:
        warn(f"dropped {dropped} of {n_all} {source.name} sample(s) with a missing {target_name} or group value")
    pool = np.flatnonzero(valid)
    if len(pool) == 0:
        raise DataError(f"no {source.name} samples have both a {target_name} and a group value", "check the label columns")
    if limit is not None and not source.presized and int(limit) < len(pool):
        split_key = source.split[pool] if source.split is not None else np.zeros(len(pool), np.int64)
        strata = strata_of(split_key, y[pool], g[pool])
        pool = pool[stratified_subsample(strata, int(limit), LIMIT_SEED)]

    images, ok, load_info = source.load_images(pool, image_size)
    if not ok.all():
        bad = [source.ids[i] for i in pool[~ok]]
        warn(
            f"skipped {len(bad)} {source.name} image(s) that could not be decoded: "
            f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}"
        )
        pool, images = pool[ok], images[ok]
    if len(pool) == 0:
        raise DataError(f"no {source.name} image could be decoded", "check that the files are valid images")

    yp, gp = y[pool], g[pool]
    counts = np.bincount(gp, minlength=len(group_names))
    empty = [group_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        present = ", ".join(f"{group_names[i]}={int(c)}" for i, c in enumerate(counts) if c)
        raise DataError(
            f"group(s) {', '.join(repr(e) for e in empty)} of --fair-groups {group_attr} have no images"
            + (f" among the {len(pool)} kept by --limit {limit}" if limit is not None else "")
            + f" (others: {present})",
            "use a coarser --fair-groups (fewer attributes)"
            + (", a larger --limit" if limit is not None else "")
            + " or data that contains every group",
        )

    official = source.split[pool] if source.split is not None else None
    parts = stratified_split(
        yp, gp, seed=int(seed), val_fraction=float(val_fraction), test_fraction=float(test_fraction), official=official
    )
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    mean, std = channel_stats(images_t[torch.from_numpy(parts["train"])])
    ids = [source.ids[i] for i in pool]

    def make(idx: np.ndarray, train: bool) -> GroupedDataset:
        it = torch.from_numpy(idx)
        return GroupedDataset(
            images_t[it],
            torch.from_numpy(yp[idx]),
            torch.from_numpy(gp[idx]),
            group_names=group_names,
            class_names=class_names,
            mean=mean,
            std=std,
            train=train,
            ids=[ids[i] for i in idx],
        )

    train_ds = make(parts["train"], True)
    val_ds = make(parts["val"], False)
    test_ds = make(parts["test"], False)

    test_counts = test_ds.group_counts()
    small = {k: v for k, v in test_counts.items() if v < int(min_group_test)}
    if small:
        warn(
            f"{len(small)} group(s) have fewer than {min_group_test} test samples "
            f"({', '.join(f'{k}={v}' for k, v in small.items())}): their accuracy is noisy"
        )
    train_classes = train_ds.class_counts()
    missing_classes = [k for k, v in train_classes.items() if v == 0]
    if missing_classes:
        warn(
            f"{len(missing_classes)} class(es) have no training samples: "
            f"{', '.join(missing_classes[:5])}{', ...' if len(missing_classes) > 5 else ''}"
        )

    info = {
        "kind": kind,
        "path": str(path) if path is not None else None,
        "available": n_all,
        "used": int(len(pool)),
        "dropped_missing": dropped,
        "decode_failed": int((~ok).sum()),
        "official_split": source.split is not None,
        "cache": load_info.get("cache"),
        "cache_path": load_info.get("path"),
        "load_seconds": round(float(load_info.get("seconds", 0.0)), 4),
        "seconds": round(time.perf_counter() - t0, 4),
        "source": source.info,
    }
    return DataBundle(
        name=source.name,
        train=train_ds,
        val=val_ds,
        test=test_ds,
        num_classes=len(class_names),
        class_names=class_names,
        group_attribute=group_attr,
        group_names=group_names,
        target=target_name,
        mean=mean,
        std=std,
        image_size=image_size,
        seed=int(seed),
        spec=os.fspath(spec) if not isinstance(spec, str) else spec,
        val_fraction=float(val_fraction),
        test_fraction=float(test_fraction),
        limit=int(limit) if limit is not None else None,
        info=info,
    )
