"""Tests for relucomp.data: every spec kind in its real on-disk format, splits, caching, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import relucomp.data.decode as decode_mod
from _datagen import (
    RACES,
    write_cifar10,
    write_cifar100,
    write_csv_folder,
    write_imagefolder,
    write_svhn,
    write_utkface,
)
from relucomp.data import (
    DataBundle,
    DataWarning,
    GroupedDataset,
    load_data,
    make_synthetic,
    parse_data_spec,
    random_crop_flip_batch,
)
from relucomp.data.splits import stratified_split
from relucomp.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache in tests."""
    monkeypatch.setenv("RELUCOMP_CACHE", str(tmp_path / "default-cache"))


def _ids(ds: GroupedDataset) -> list[str]:
    return list(ds.ids)


def _check_partition(b: DataBundle) -> None:
    all_ids = _ids(b.train) + _ids(b.val) + _ids(b.test)
    assert len(all_ids) == len(set(all_ids)), "splits overlap"


# ------------------------------------------------------------------ synthetic
@pytest.fixture(scope="module")
def syn() -> DataBundle:
    return load_data("synthetic")


def test_synthetic_default_shapes_and_groups(syn):
    assert syn.name == "synthetic" and syn.target == "label" and syn.group_attribute == "group"
    assert syn.num_classes == 10 and len(syn.class_names) == 10
    assert syn.group_names == ["A", "B", "C"]
    n = len(syn.train) + len(syn.val) + len(syn.test)
    assert n == 6000
    assert (len(syn.train), len(syn.val), len(syn.test)) == (4200, 600, 1200)
    groups = torch.cat([syn.train.groups, syn.val.groups, syn.test.groups])
    frac = torch.bincount(groups, minlength=3).float() / n
    assert torch.allclose(frac, torch.tensor([0.7, 0.2, 0.1]), atol=0.01)
    assert syn.train.images.dtype == torch.uint8 and syn.train.images.shape[1:] == (3, 32, 32)
    x, y, g = syn.test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and g.dtype == torch.int64 and y.dim() == 0
    _check_partition(syn)
    # every (class, group) stratum is split 70/10/20 up to one sample
    s = syn.summary()
    for gname in syn.group_names:
        for cname in syn.class_names:
            tot = sum(s["splits"][sp]["group_classes"][gname][cname] for sp in ("train", "val", "test"))
            assert abs(s["splits"]["test"]["group_classes"][gname][cname] - 0.2 * tot) <= 1.0
            assert abs(s["splits"]["val"]["group_classes"][gname][cname] - 0.1 * tot) <= 1.0


def test_synthetic_generation_deterministic():
    # (its speed is benchmarks/bench_data.py's business, not a timed unit test's)
    a = make_synthetic(6000)
    small1, small2 = make_synthetic(300), make_synthetic(300)
    for u, v in zip(small1, small2):
        assert np.array_equal(u, v)
    assert a[0].shape == (6000, 3, 32, 32) and a[0].dtype == np.uint8
    assert make_synthetic(300, size=16)[0].shape == (300, 3, 16, 16)
    # labels/groups do not depend on the resolution
    assert np.array_equal(make_synthetic(300, size=16)[1], small1[1])


def test_synthetic_minority_groups_are_harder(syn):
    """Lower contrast and more pixel noise in B and C than in A."""
    imgs = syn.train.images.float() / 255
    hf = (imgs[..., 1:, :] - imgs[..., :-1, :]).abs().mean(dim=(1, 2, 3))  # high-frequency energy
    g = syn.train.groups
    # noise level: A < B < C once the pattern edges are averaged out
    noise = [hf[g == k].median().item() for k in range(3)]
    assert noise[0] < noise[1] < noise[2]


def test_synthetic_normalisation_and_augmentation(syn):
    x, y, g = syn.train.as_tensors()
    assert x.shape == syn.train.images.shape and x.dtype == torch.float32
    m = x.mean(dim=(0, 2, 3))
    s = x.std(dim=(0, 2, 3))
    assert torch.allclose(m, torch.zeros(3), atol=1e-3) and torch.allclose(s, torch.ones(3), atol=1e-2)
    assert len(syn.mean) == 3 and len(syn.std) == 3
    assert syn.train.train and not syn.test.train
    # test samples are deterministic, train samples are augmented
    assert torch.equal(syn.test[3][0], syn.test[3][0])
    torch.manual_seed(0)
    views = [syn.train[5][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(syn.train.with_augmentation(False)[5][0], x[5])
    sub = syn.test.subset([0, 2, 4])
    assert len(sub) == 3 and sub.ids == [syn.test.ids[i] for i in (0, 2, 4)]
    assert torch.equal(sub.labels, syn.test.labels[[0, 2, 4]])
    loader = torch.utils.data.DataLoader(syn.val, batch_size=64)
    xb, yb, gb = next(iter(loader))
    assert xb.shape == (64, 3, 32, 32) and yb.shape == (64,) and gb.shape == (64,)


def test_synthetic_limit_and_seeds():
    a = load_data("synthetic", limit=600, seed=0, min_group_test=0)
    b = load_data("synthetic", limit=600, seed=0, min_group_test=0)
    c = load_data("synthetic", limit=600, seed=1, min_group_test=0)
    assert len(a.train) + len(a.val) + len(a.test) == 600
    assert _ids(a.test) == _ids(b.test) and _ids(a.train) == _ids(b.train)
    assert torch.equal(a.test.images, b.test.images)
    assert _ids(a.test) != _ids(c.test)
    assert a.test.group_counts() == c.test.group_counts()  # stratified: same sizes, other members


def test_summary_and_save_splits(tmp_path):
    b = load_data("synthetic", limit=600, min_group_test=0)
    s = b.summary()
    json.dumps(s)  # JSON-serialisable
    assert s["total"] == 600 and s["splits"]["test"]["n"] == 120
    assert sum(s["splits"]["train"]["groups"].values()) == len(b.train)
    p = b.save_splits(tmp_path / "out")
    doc = json.loads(Path(p).read_text())
    assert p.name == "splits.json"
    assert doc["splits"]["test"]["ids"] == b.test.ids
    assert doc["splits"]["train"]["labels"] == b.train.labels.tolist()
    assert doc["group_names"] == ["A", "B", "C"] and doc["seed"] == 0
    p2 = b.save_splits(tmp_path / "x.json")
    assert p2 == tmp_path / "x.json" and p2.exists()


def test_min_group_test_warning():
    with pytest.warns(DataWarning, match="fewer than 20 test samples"):
        b = load_data("synthetic", limit=300)
    assert b.test.group_counts()["C"] < 20
    with pytest.warns(DataWarning, match=r"fewer than 30 test samples \(B=24, C=12\)"):
        load_data("synthetic", limit=600, min_group_test=30)


def test_split_function_official_and_fractions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    g = rng.integers(0, 2, 500)
    official = np.where(np.arange(500) < 400, 0, 2)
    parts = stratified_split(y, g, seed=3, val_fraction=0.1, test_fraction=0.2, official=official)
    assert np.array_equal(parts["test"], np.arange(400, 500))
    assert len(parts["val"]) == 40 and len(parts["train"]) == 360
    assert not set(parts["val"]) & set(parts["train"])
    parts = stratified_split(y, g, seed=3, val_fraction=0.0, test_fraction=0.25)
    assert len(parts["val"]) == 0 and len(parts["test"]) == 125 and len(parts["train"]) == 375


def test_batch_augmentation_is_a_padded_crop():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = random_crop_flip_batch(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = False
        for flip in (False, True):
            src = padded[i].flip(-1) if flip else padded[i]
            for t in range(5):
                for l_ in range(5):
                    if torch.equal(src[:, t : t + 8, l_ : l_ + 8], out[i]):
                        found = True
        assert found


# ------------------------------------------------------------------ UTKFace
@pytest.fixture()
def utk(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "UTKFace"
    meta = write_utkface(root, per_cell=4)
    return root, meta


def test_utkface_parse_labels_groups_and_bad_files(utk, tmp_path):
    root, meta = utk
    with pytest.warns(DataWarning) as rec:
        b = load_data(f"utkface:{root}", cache_dir=tmp_path / "c", min_group_test=0)
    msgs = [str(w.message) for w in rec]
    assert any("skipped 2 UTKFace file(s)" in m and meta["malformed"][0] in m for m in msgs)
    assert any("could not be decoded" in m and meta["corrupt"][0] in m for m in msgs)
    assert b.name == "utkface" and b.target == "gender" and b.group_attribute == "race"
    assert b.class_names == ["Male", "Female"] and b.group_names == RACES
    total = len(b.train) + len(b.val) + len(b.test)
    assert total == len(meta["records"]) == 40
    assert b.info["source"]["malformed_names"] == 2 and b.info["decode_failed"] == 1
    # labels and groups match the file names
    expected = {name: (gender, race) for name, _, gender, race in meta["records"]}
    for ds in (b.train, b.val, b.test):
        for i, fid in enumerate(ds.ids):
            assert (int(ds.labels[i]), int(ds.groups[i])) == expected[fid]
    assert len(b.test) == 8 and len(b.val) == 4
    _check_partition(b)


def test_utkface_targets_and_intersections(utk, tmp_path):
    root, meta = utk
    c = tmp_path / "c"
    with pytest.warns(DataWarning):
        b = load_data(f"utkface:{root}", target="race", fair_groups="race,gender", cache_dir=c, min_group_test=0)
    assert b.class_names == RACES and b.group_attribute == "race,gender"
    assert len(b.group_names) == 10 and b.group_names[:3] == ["White/Male", "White/Female", "Black/Male"]
    for ds in (b.train, b.test):
        for i, fid in enumerate(ds.ids):
            name = b.group_names[int(ds.groups[i])]
            assert name.startswith(RACES[int(ds.labels[i])] + "/")
    with pytest.warns(DataWarning):
        b = load_data(f"utkface:{root}", target="age-bin", fair_groups="gender", cache_dir=c, min_group_test=0)
    assert b.class_names == ["0-1", "2-12", "13-17", "18-64", "65+"] and b.group_names == ["Male", "Female"]
    ages = {name: age for name, age, _, _ in meta["records"]}
    bins = {1: 0, 10: 1, 15: 2, 30: 3, 70: 4}
    for i, fid in enumerate(b.train.ids):
        assert int(b.train.labels[i]) == bins[ages[fid]]
    with pytest.warns(DataWarning):
        b = load_data(f"utkface:{root}", target="age>=18", fair_groups="none", cache_dir=c, min_group_test=0)
    assert b.class_names == ["age<18", "age>=18"] and b.group_names == ["all"] and b.group_attribute is None
    for i, fid in enumerate(b.test.ids):
        assert int(b.test.labels[i]) == int(ages[fid] >= 18)


def test_utkface_errors(utk, tmp_path):
    root, _ = utk
    with pytest.warns(DataWarning), pytest.raises(DataError, match="unknown --target 'smile'") as ei:
        load_data(f"utkface:{root}", target="smile", cache_dir=tmp_path / "c")
    assert "race" in ei.value.fix and "age-bin" in ei.value.fix and "age>=N" in ei.value.fix
    with pytest.warns(DataWarning), pytest.raises(DataError, match="unknown --fair-groups 'skin'") as ei:
        load_data(f"utkface:{root}", fair_groups="race,skin", cache_dir=tmp_path / "c")
    assert "gender" in ei.value.fix
    with pytest.warns(DataWarning), pytest.raises(DataError, match="numeric") as ei:
        load_data(f"utkface:{root}", target="age", cache_dir=tmp_path / "c")
    assert "age>=N" in ei.value.fix
    # a race missing from the folder is an empty group
    no_others = tmp_path / "no_others"
    write_utkface(no_others, per_cell=2, races=range(4), malformed=0, corrupt=0)
    with pytest.raises(DataError, match="'Others'.*no images") as ei:
        load_data(f"utkface:{no_others}", cache_dir=tmp_path / "c")
    assert "--fair-groups" in ei.value.fix
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no UTKFace images found"):
        load_data(f"utkface:{empty}")


def test_utkface_cache_hit_skips_decoding(utk, tmp_path, monkeypatch):
    root, _ = utk
    cache = tmp_path / "cache"
    with pytest.warns(DataWarning):
        first = load_data(f"utkface:{root}", image_size=16, cache_dir=cache, min_group_test=0)
    assert first.info["cache"] == "miss"
    assert len(list(cache.glob("*.npy"))) == 1 and len(list(cache.glob("*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(decode_mod, "decode_files", boom)
    with pytest.warns(DataWarning) as rec:  # the corrupt file is still reported on a hit
        second = load_data(f"utkface:{root}", image_size=16, cache_dir=cache, min_group_test=0)
    assert any("could not be decoded" in str(w.message) for w in rec)
    assert second.info["cache"] == "hit"
    assert torch.equal(first.train.images, second.train.images)
    assert second.train.images.shape[1:] == (3, 16, 16)
    # another size (or a touched file) is a new key -> decodes again
    with pytest.warns(DataWarning), pytest.raises(AssertionError, match="decoded although cached"):
        load_data(f"utkface:{root}", image_size=20, cache_dir=cache, min_group_test=0)
    f = next(root.glob("1_*.jpg.chip.jpg"))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.warns(DataWarning), pytest.raises(AssertionError, match="decoded although cached"):
        load_data(f"utkface:{root}", image_size=16, cache_dir=cache, min_group_test=0)


def test_utkface_limit_is_stratified_and_cached_separately(tmp_path):
    root = tmp_path / "U"
    write_utkface(root, per_cell=10, malformed=0, corrupt=0, size=16)
    cache = tmp_path / "cache"
    b = load_data(f"utkface:{root}", limit=50, cache_dir=cache, min_group_test=0)
    total = len(b.train) + len(b.val) + len(b.test)
    assert total == 50
    counts = {g: b.train.group_counts()[g] + b.val.group_counts()[g] + b.test.group_counts()[g] for g in RACES}
    assert set(counts.values()) == {10}
    assert b.info["cache"] == "miss" and b.info["used"] == 50 and b.info["available"] == 100


# ------------------------------------------------------------------ CIFAR
def test_cifar10_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    meta = write_cifar10(root)
    b = load_data(f"cifar10:{root}")
    assert b.name == "cifar10" and b.class_names == meta["names"] and b.num_classes == 10
    assert b.group_names == ["all"] and b.group_attribute is None
    assert len(b.test) == 30 and len(b.train) + len(b.val) == 100 and len(b.val) == 10
    assert b.test.labels.tolist() == meta["test_labels"]
    assert b.test.ids[0] == "test/0" and all(i.startswith("train/") for i in b.train.ids)
    # pixels: row-major 3x32x32 like the original
    import pickle

    with open(root / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert torch.equal(b.test.images[0], torch.from_numpy(raw[0].reshape(3, 32, 32)))
    # the parent folder and a bare path work too; different seeds carve different val sets
    b2 = load_data(f"cifar10:{tmp_path}", seed=1, min_group_test=0)
    assert b2.test.ids == b.test.ids and b2.val.ids != b.val.ids
    assert parse_data_spec(str(root)) == ("cifar10", root)
    b3 = load_data(str(root), image_size=16, min_group_test=0)
    assert b3.train.images.shape[1:] == (3, 16, 16)
    with pytest.raises(DataError, match="CIFAR10 batches but the spec says cifar100"):
        load_data(f"cifar100:{root}")


def test_cifar100_fine_and_coarse(tmp_path):
    root = tmp_path / "c100"
    meta = write_cifar100(root)
    b = load_data(f"cifar100:{root}", fair_groups="coarse", min_group_test=0)
    assert b.num_classes == 100 and b.class_names == meta["fine_names"]
    assert b.group_names == meta["coarse_names"] and b.group_attribute == "coarse"
    assert len(b.test) == 100 and len(b.train) + len(b.val) == 200
    assert torch.equal(b.train.groups, b.train.labels // 5)
    c = load_data(f"cifar100:{root}", target="coarse", min_group_test=0)
    assert c.num_classes == 20 and c.class_names == meta["coarse_names"] and c.group_names == ["all"]


def test_cifar_jpeg_imagefolder(tmp_path):
    root = tmp_path / "cifar10-jpeg"
    write_imagefolder(root, classes=("airplane", "cat"), per_class=10, splits=("train", "test"), ext=".jpg", size=32)
    b = load_data(f"cifar10:{root}", cache_dir=tmp_path / "c", min_group_test=0)
    assert b.name == "cifar10" and b.class_names == ["airplane", "cat"]
    assert len(b.test) == 20 and len(b.train) + len(b.val) == 20 and len(b.val) == 2
    assert all(i.startswith("test/") for i in b.test.ids)


# ------------------------------------------------------------------ SVHN
def test_svhn_mat(tmp_path):
    root = tmp_path / "svhn"
    digits = write_svhn(root)
    b = load_data(f"svhn:{root}", min_group_test=0)
    assert b.name == "svhn" and b.class_names == [str(d) for d in range(10)]
    assert len(b.test) == 20 and len(b.train) + len(b.val) == 40
    assert b.test.labels.tolist() == digits["test"].tolist()  # label 10 -> 0
    # X is H x W x C x N: red pixel (0,0) of image i was set to its digit
    assert torch.equal(b.test.images[:, 0, 0, 0].long(), b.test.labels)
    assert parse_data_spec(str(root))[0] == "svhn"


# ------------------------------------------------------------------ folders
def test_csv_folder(tmp_path):
    root = tmp_path / "derm"
    write_csv_folder(root)
    with pytest.warns(DataWarning, match="skipped 1 row"):
        b = load_data(f"folder:{root}", fair_groups="skin", cache_dir=tmp_path / "c", min_group_test=0)
    assert b.name == "folder" and b.target == "label" and b.class_names == ["benign", "malignant"]
    assert b.group_attribute == "skin" and b.group_names == ["dark", "light", "medium"]
    assert len(b.train) + len(b.val) + len(b.test) == 48
    import pandas as pd

    df = pd.read_csv(root / "labels.csv").set_index("filename")
    for ds in (b.train, b.test):
        for i, fid in enumerate(ds.ids):
            assert b.class_names[int(ds.labels[i])] == df.loc[fid, "label"]
            assert b.group_names[int(ds.groups[i])] == df.loc[fid, "skin"]
    # the CSV itself as the spec, other target and intersection
    with pytest.warns(DataWarning):
        c = load_data(f"folder:{root / 'labels.csv'}", target="skin", fair_groups="age>=50,label", cache_dir=tmp_path / "c", min_group_test=0)
    assert c.class_names == ["dark", "light", "medium"] and "age>=50/malignant" in c.group_names
    with pytest.warns(DataWarning), pytest.raises(DataError, match="unknown --fair-groups 'sex'") as ei:
        load_data(f"folder:{root}", fair_groups="sex", cache_dir=tmp_path / "c")
    assert "skin" in ei.value.fix and "label" in ei.value.fix


def test_categorical_age_column_says_what_works(tmp_path):
    root = tmp_path / "derm"
    write_csv_folder(root, missing_rows=0)
    csv = root / "labels.csv"
    lines = csv.read_text().splitlines()
    cats = ["20-29", "30-39", "more than 70"]
    out = [lines[0]] + [",".join(line.split(",")[:3] + [cats[i % 3]]) for i, line in enumerate(lines[1:])]
    csv.write_text("\n".join(out) + "\n")
    for target in ("age-bin", "age>=20"):
        with pytest.raises(DataError) as ei:
            load_data(f"folder:{root}", target=target, cache_dir=tmp_path / "c", min_group_test=0)
        assert "holds categories" in ei.value.cause and "'more than 70'" in ei.value.cause
        assert "--target age" in ei.value.fix
    with pytest.raises(DataError, match="--fair-groups 'age>=30'.*holds categories"):
        load_data(f"folder:{root}", fair_groups="age>=30", cache_dir=tmp_path / "c", min_group_test=0)
    b = load_data(f"folder:{root}", target="age", cache_dir=tmp_path / "c", min_group_test=0)  # what works
    assert b.class_names == cats


def test_csv_folder_split_column_and_file_column(tmp_path):
    root = tmp_path / "d"
    write_csv_folder(root, split_column=True, file_column="image", missing_rows=0)
    b = load_data(f"folder:{root}", cache_dir=tmp_path / "c", min_group_test=0)
    assert b.info["official_split"] and len(b.test) == 10  # i % 5 == 0 of 48
    bad = tmp_path / "bad"
    write_csv_folder(bad, file_column="picture", missing_rows=0)
    with pytest.raises(DataError, match="no file column") as ei:
        load_data(f"folder:{bad}")
    assert "filename" in ei.value.fix


def test_imagefolder_layouts(tmp_path):
    flat = tmp_path / "flat"
    write_imagefolder(flat, per_class=10)
    b = load_data(f"folder:{flat}", cache_dir=tmp_path / "c", min_group_test=0)
    assert b.class_names == ["cat", "dog", "fish"] and len(b.test) == 6 and len(b.val) == 3
    assert b.group_names == ["all"]
    for ds in (b.train, b.test):
        for i, fid in enumerate(ds.ids):
            assert fid.split(os.sep)[0] == b.class_names[int(ds.labels[i])]
    split = tmp_path / "split"
    write_imagefolder(split, per_class=6, splits=("train", "test"), ext=".jpg")
    b = load_data(str(split), cache_dir=tmp_path / "c", min_group_test=0)
    assert b.info["official_split"] and len(b.test) == 18
    with pytest.raises(DataError, match="unknown --target 'species'"):
        load_data(f"folder:{flat}", target="species", cache_dir=tmp_path / "c")


# ------------------------------------------------------------------ specs and errors
def test_parse_data_spec(tmp_path):
    assert parse_data_spec("synthetic") == ("synthetic", None)
    assert parse_data_spec("utkface:/x/UTKFace") == ("utkface", Path("/x/UTKFace"))
    assert parse_data_spec("CIFAR-100:/d") == ("cifar100", Path("/d"))
    assert parse_data_spec("folder:~/imgs")[1] == Path("~/imgs").expanduser()
    with pytest.raises(DataError, match="unknown data spec kind 'imagenet'") as ei:
        parse_data_spec("imagenet:/data")
    assert "utkface:PATH" in ei.value.fix
    with pytest.raises(DataError, match="needs a path"):
        parse_data_spec("utkface")
    with pytest.raises(DataError, match="synthetic takes no path"):
        parse_data_spec("synthetic:/x")
    with pytest.raises(DataError, match="not a known kind and no such path"):
        parse_data_spec(str(tmp_path / "nope"))


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"utkface:{tmp_path / 'missing'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_data(f"folder:{empty}")
    with pytest.raises(DataError, match="no CIFAR10 data found"):
        load_data(f"cifar10:{empty}")
    with pytest.raises(DataError, match="no SVHN data"):
        load_data(f"svhn:{empty}")
    with pytest.raises(DataError, match="leaves no training data"):
        load_data("synthetic", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="limit"):
        load_data("synthetic", limit=0)
    with pytest.raises(DataError, match="unknown --target 'age'"):
        load_data("synthetic", target="age", limit=100)


# ------------------------------------------------------------------ real data (skipped when absent)
def _real_utkface() -> Path | None:
    for base in (Path("/work/shared/data"), REPO.parent / "shared" / "data"):
        p = base / "utkface" / "UTKFace"
        if p.is_dir():
            return p
    return None


def test_real_utkface_limit_500(tmp_path):
    root = _real_utkface()
    if root is None:
        pytest.skip("real UTKFace not available (../shared/data absent)")
    with pytest.warns(DataWarning, match="skipped 3 UTKFace file"):
        b = load_data(f"utkface:{root}", limit=500, cache_dir=tmp_path / "c", min_group_test=0)
    assert b.info["available"] == 23705
    assert b.group_names == ["White", "Black", "Asian", "Indian", "Others"]
    counts = {g: b.train.group_counts()[g] + b.val.group_counts()[g] + b.test.group_counts()[g] for g in b.group_names}
    assert sum(counts.values()) == 500
    # full-set shares: White 42.5%, Black 19.1%, Asian 14.5%, Indian 16.8%, Others 7.1%
    full = {"White": 10078, "Black": 4526, "Asian": 3434, "Indian": 3975, "Others": 1692}
    for g, n in full.items():
        assert abs(counts[g] - 500 * n / 23705) <= 3, counts
    assert b.train.images.shape[1:] == (3, 32, 32)
    assert 0.3 < b.mean[0] < 0.8  # faces, not black frames


def test_imagefolder_train_val_only_carves_test(tmp_path):
    root = tmp_path / "tv"
    write_imagefolder(root, classes=("a", "b"), per_class=10, splits=("train", "val"))
    b = load_data(f"folder:{root}", cache_dir=tmp_path / "c", min_group_test=0)
    assert b.class_names == ["a", "b"]  # split folders are not classes
    assert len(b.val) == 20 and len(b.test) == 4 and len(b.train) == 16
    assert all(i.startswith("val") for i in b.val.ids) and all(i.startswith("train") for i in b.test.ids)


def test_default_cache_location(tmp_path, monkeypatch):
    from relucomp.data import default_cache_dir

    monkeypatch.setenv("RELUCOMP_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "data"
    monkeypatch.setenv("RELUCOMP_CACHE", "off")
    assert default_cache_dir() is None
    monkeypatch.delenv("RELUCOMP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "relucomp" / "data"
    # with the env var pointing at a temp root, a folder load caches under <root>/data
    monkeypatch.setenv("RELUCOMP_CACHE", str(tmp_path / "root"))
    write_imagefolder(tmp_path / "f", classes=("a", "b"), per_class=5)
    b = load_data(f"folder:{tmp_path / 'f'}", min_group_test=0)
    assert b.info["cache"] == "miss" and Path(b.info["cache_path"]).parent == tmp_path / "root" / "data"
