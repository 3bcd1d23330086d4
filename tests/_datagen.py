"""Write tiny data sets in the real on-disk formats (for tests of relucomp.data)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

RACES = ["White", "Black", "Asian", "Indian", "Others"]


def _img(rng: np.random.Generator, size: int = 24, tint: tuple[int, int, int] | None = None) -> Image.Image:
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if tint is not None:
        arr = (arr // 4 + np.array(tint, dtype=np.uint8) // 4 * 3).astype(np.uint8)
    return Image.fromarray(arr)


def write_utkface(root: Path, per_cell: int = 3, *, races=range(5), malformed: int = 2, corrupt: int = 1, size: int = 24, seed: int = 0) -> dict:
    """``per_cell`` faces per (race, gender) at ages cycling 1, 10, 15, 30, 70; plus bad files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ages = [1, 10, 15, 30, 70]
    n = 0
    records = []
    for race in races:
        for gender in (0, 1):
            for k in range(per_cell):
                age = ages[(k + race + gender) % len(ages)]
                name = f"{age}_{gender}_{race}_2017011{race}{gender}{k:04d}{n:03d}.jpg.chip.jpg"
                _img(rng, size, tint=(40 * race, 100 * gender, 200)).save(root / name, quality=90)
                records.append((name, age, gender, race))
                n += 1
    bad_names = []
    for k in range(malformed):  # a field missing, like the three in the real release
        name = f"{30 + k}_1_2017010914240807{k}.jpg.chip.jpg"
        _img(rng, size).save(root / name)
        bad_names.append(name)
    corrupt_names = []
    for k in range(corrupt):
        name = f"25_0_0_20170109999999{k:03d}.jpg.chip.jpg"
        (root / name).write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(range(50)))
        corrupt_names.append(name)
    (root / "README.txt").write_text("not an image")
    return {"records": records, "malformed": bad_names, "corrupt": corrupt_names}


def _cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30, seed: int = 0) -> dict:
    """``data_batch_1..5``, ``test_batch``, ``batches.meta`` with bytes keys, like the original."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    all_labels = []
    for b in range(1, 6):
        labels = [int(v) for v in np.arange(per_batch) % 10]
        all_labels += labels
        d = {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": labels,
            b"data": _cifar_rows(rng, per_batch),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(root / f"data_batch_{b}", "wb") as f:
            pickle.dump(d, f, protocol=2)
    test_labels = [int(v) for v in np.arange(test) % 10]
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": _cifar_rows(rng, test), b"filenames": [b"t.png"] * test}, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    return {"train_labels": all_labels, "test_labels": test_labels, "names": [n.decode() for n in names]}


def write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> dict:
    """``train``, ``test``, ``meta`` with fine and coarse labels (coarse = fine // 5 here)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_names = [f"fine{i:02d}".encode() for i in range(100)]
    coarse_names = [f"super{i:02d}".encode() for i in range(20)]
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        fine = [int(v) for v in np.tile(np.arange(100), per)]
        coarse = [f // 5 for f in fine]
        d = {
            b"filenames": [b"x.png"] * len(fine),
            b"batch_label": split.encode(),
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": _cifar_rows(rng, len(fine)),
        }
        with open(root / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": fine_names, b"coarse_label_names": coarse_names}, f, protocol=2)
    return {"fine_names": [n.decode() for n in fine_names], "coarse_names": [n.decode() for n in coarse_names]}


def write_svhn(root: Path, train: int = 40, test: int = 20, seed: int = 0) -> dict:
    """``train_32x32.mat`` / ``test_32x32.mat``: X 32x32x3xN uint8, y Nx1 with 10 meaning digit 0."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", train), ("test", test)):
        digits = np.arange(n) % 10
        y = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        x[0, 0, 0, :] = digits  # pixel (0,0) red encodes the digit, to check the transpose
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = digits
    return out


def write_imagefolder(root: Path, classes=("cat", "dog", "fish"), per_class: int = 8, splits: tuple[str, ...] | None = None, ext: str = ".png", size: int = 20, seed: int = 0) -> dict:
    """``root/<class>/*`` or, with ``splits``, ``root/<split>/<class>/*``."""
    rng = np.random.default_rng(seed)
    counts = {}
    for split in splits or (None,):
        base = root / split if split else root
        for c in classes:
            d = base / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _img(rng, size).save(d / f"{c}_{i:03d}{ext}")
        counts[split] = per_class * len(classes)
    return counts


def write_csv_folder(root: Path, n: int = 48, *, missing_rows: int = 1, split_column: bool = False, file_column: str = "filename", size: int = 30, seed: int = 0) -> dict:
    """``root/images/*.jpg`` + ``root/labels.csv`` with filename, label, skin, age (and split)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"images/p{i:03d}.jpg"
        _img(rng, size + (i % 3) * 4, tint=(0, 0, 0)).save(root / name)  # some non-square sizes below
        label = ["benign", "malignant"][i % 2]
        skin = ["light", "dark"][(i // 2) % 2] if i % 4 else "medium"
        age = 20 + (i * 7) % 60
        split = "test" if i % 5 == 0 else "train"
        rows.append((name, label, skin, age, split))
    for k in range(missing_rows):
        rows.append((f"images/missing_{k}.jpg", "benign", "light", 30, "train"))
    header = [file_column, "label", "skin", "age"] + (["split"] if split_column else [])
    lines = [",".join(header)]
    for r in rows:
        vals = list(r[:4]) + ([r[4]] if split_column else [])
        lines.append(",".join(str(v) for v in vals))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    # one non-square image to exercise the centre crop
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(root / "images" / "p000.jpg")
    return {"rows": rows[:n]}
