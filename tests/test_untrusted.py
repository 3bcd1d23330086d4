"""Inputs that cannot hurt: planted pickle payloads in a CIFAR batch and in a 2PC worker message are refused."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from relucomp.data import load_data
from relucomp.data.cifar import read_pickle
from relucomp.errors import DataError
from relucomp.pi.worker import decode_share, encode_share
from tests._datagen import write_cifar10


class _Payload:
    """Unpickling this runs ``os.system`` (touches a marker file) — what a hostile file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batch_with_code_is_refused(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar10(root)
    marker = tmp_path / "pwned"
    good = read_pickle(root / "data_batch_1")
    assert good["data"].dtype == np.uint8 and good["data"].shape[1] == 3072 and isinstance(good["labels"], list)
    # sanity: a plain pickle.load of the planted file *would* run the payload
    evil = {b"batch_label": b"x", b"labels": [0], b"data": good["data"][:1], b"filenames": [_Payload(marker)]}
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump(evil, f, protocol=2)
    with pytest.raises(DataError) as err:
        load_data(f"cifar10:{root}")
    assert "posix.system" in err.value.cause or "os.system" in err.value.cause
    assert "refusing" in err.value.cause and err.value.fix
    assert not marker.exists()
    with open(root / "data_batch_2", "rb") as f:  # the control: the payload is real
        pickle.load(f)
    assert marker.exists()


def test_real_format_batch_written_by_numpy1_names_loads(tmp_path):
    """Batches pickled under numpy 1.x name ``numpy.core.multiarray._reconstruct``; they still load."""
    arr = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": arr, b"labels": [1, 2]}, protocol=2)
    for new in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        data = raw.replace(b"numpy._core.multiarray", new) if b"numpy._core.multiarray" in raw else raw
        p = tmp_path / "batch"
        p.write_bytes(data)
        out = read_pickle(p)
        assert np.array_equal(out["data"], arr) and out["labels"] == [1, 2]


def test_worker_share_messages_are_data_not_code(tmp_path):
    meta, chunks = b"\x08\x01meta", [b"chunk-0", b"", bytes(range(256))]
    msg = encode_share(meta, chunks)
    assert decode_share(msg) == (meta, chunks)
    marker = tmp_path / "pwned"
    planted = pickle.dumps((b"m", [_Payload(marker)]), protocol=4)
    with pytest.raises(ValueError, match="not in relucomp's share format"):
        decode_share(planted)
    # a payload smuggled after a valid header is refused as well, never unpickled
    with pytest.raises(ValueError):
        decode_share(msg + planted)
    with pytest.raises(ValueError, match="truncated"):
        decode_share(msg[:-3])
    assert not marker.exists()


def test_no_unrestricted_unpickling_in_the_package():
    """Every load of bytes in relucomp/ is restricted (weights_only / allow_pickle=False / no pickle.load)."""
    import pathlib
    import re

    import relucomp

    root = pathlib.Path(relucomp.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"pickle\.loads?\(|torch\.load\(|np\.load\(", text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):  # the whole call, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            s = text[m.start():end + 1]
            if s.startswith("pickle") or ("torch.load" in s and "weights_only=True" not in s) or (
                    "np.load" in s and "allow_pickle=False" not in s):
                bad.append(f"{path.name}: {s}")
    assert bad == []
