"""UTKFace: ``[age]_[gender]_[race]_[datetime].jpg(.chip.jpg)`` files in one folder (searched recursively).

gender: 0 Male, 1 Female.  race: 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.
Files whose name does not parse (the original release has three with a field
missing) are counted and skipped with a warning.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import cache as _cache
from .base import Column, Source, warn

__all__ = ["GENDER_NAMES", "RACE_NAMES", "AGE_BINS", "parse_utkface_name", "utkface_source", "looks_like_utkface"]

GENDER_NAMES = ["Male", "Female"]
RACE_NAMES = ["White", "Black", "Asian", "Indian", "Others"]
# (low, high) inclusive, names
AGE_BINS = [(0, 1, "0-1"), (2, 12, "2-12"), (13, 17, "13-17"), (18, 64, "18-64"), (65, 10_000, "65+")]

_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_[^_]*\.(?:jpg|jpeg|png)(?:\.chip\.jpg)?$", re.IGNORECASE)
_CANDIDATE = re.compile(r"\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """``(age, gender, race)`` from a UTKFace file name, or ``None`` if malformed."""
    m = _NAME.match(os.path.basename(name))
    if not m:
        return None
    age, gender, race = (int(v) for v in m.groups())
    if gender not in (0, 1) or race not in range(len(RACE_NAMES)) or not 0 <= age <= 150:
        return None
    return age, gender, race


def _list_images(root: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if _CANDIDATE.search(f) and not f.startswith("."):
                out.append(f if rel == "." else os.path.join(rel, f))
    out.sort()
    return out


def looks_like_utkface(root: Path, sample: int = 50) -> bool:
    try:
        names = sorted(n for n in os.listdir(root) if _CANDIDATE.search(n))[:sample]
    except OSError:
        return False
    return bool(names) and sum(parse_utkface_name(n) is not None for n in names) >= 0.8 * len(names)


def utkface_source(root: Path, cache_dir: Path | None) -> Source:
    files = _list_images(root)
    if not files:
        raise DataError(
            f"no UTKFace images found in {root}",
            "point utkface:PATH at the folder of [age]_[gender]_[race]_[datetime].jpg(.chip.jpg) files",
        )
    kept, ages, genders, races, bad = [], [], [], [], []
    for f in files:
        parsed = parse_utkface_name(f)
        if parsed is None:
            bad.append(f)
            continue
        kept.append(f)
        ages.append(parsed[0])
        genders.append(parsed[1])
        races.append(parsed[2])
    if bad:
        examples = ", ".join(os.path.basename(b) for b in bad[:3])
        warn(
            f"skipped {len(bad)} UTKFace file(s) whose name is not [age]_[gender]_[race]_[datetime].jpg: "
            f"{examples}{', ...' if len(bad) > 3 else ''}"
        )
    if not kept:
        raise DataError(
            f"no UTKFace images found in {root}: all {len(bad)} image file(s) have malformed names",
            "UTKFace files must be named [age]_[gender]_[race]_[datetime].jpg(.chip.jpg)",
        )
    ages_a = np.asarray(ages, dtype=np.float64)
    genders_a = np.asarray(genders, dtype=np.int64)
    races_a = np.asarray(races, dtype=np.int64)

    def load(idx: np.ndarray, size: int):
        sel = [kept[i] for i in idx]
        extra = {
            "age": ages_a[idx].astype(int).tolist(),
            "gender": genders_a[idx].tolist(),
            "race": races_a[idx].tolist(),
        }
        return _cache.decode_cached("utkface", root, sel, size, cache_dir, extra=extra)

    return Source(
        name="utkface",
        columns={
            "age": Column(ages_a, None),
            "gender": Column(genders_a, list(GENDER_NAMES)),
            "race": Column(races_a, list(RACE_NAMES)),
        },
        ids=kept,
        load_images=load,
        default_target="gender",
        default_groups="race",
        info={"files": len(files), "malformed_names": len(bad), "malformed_examples": bad[:5]},
    )
