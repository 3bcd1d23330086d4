"""Tests for relucomp.models: architectures, registry, specs, checkpoints, errors."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from relucomp.errors import ModelLoadError
from relucomp.models import (
    ARCHITECTURES,
    build_model,
    list_architectures,
    load_model,
    resnet8,
    resnet18,
    tinycnn,
)

ALL_ARCHS = ["resnet8", "resnet18", "resnet20", "resnet56", "wrn22_8", "tinycnn"]


def relu_count(model: nn.Module, size: int = 32) -> int:
    """Sum of C*H*W over all nn.ReLU outputs for one 3 x size x size image."""
    total = 0

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    """Each architecture built once (resnet18 / wrn22_8 are slow to init)."""
    torch.manual_seed(0)
    return {name: build_model(name).eval() for name in ALL_ARCHS}


# ----------------------------------------------------------------- architectures


def test_registry_lists_all_architectures() -> None:
    assert list_architectures() == sorted(ALL_ARCHS)
    assert set(ARCHITECTURES) == set(ALL_ARCHS)


def test_resnet18_relu_count(built: dict[str, nn.Module]) -> None:
    assert relu_count(built["resnet18"]) == 557_056


def test_resnet8_relu_count(built: dict[str, nn.Module]) -> None:
    assert relu_count(built["resnet8"]) == 73_728


def test_width_multiplier_scales_relus() -> None:
    assert relu_count(resnet8(width=2)) == 2 * 73_728
    assert relu_count(resnet8(width=0.5)) == 73_728 // 2


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_output_shape_and_fx_trace(built: dict[str, nn.Module], name: str) -> None:
    model = built[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        gm = torch.fx.symbolic_trace(model)
        y_fx = gm(x)
    assert y.shape == (2, 10)
    torch.testing.assert_close(y_fx, y)
    # ReLUs are standalone, non-inplace modules the passes can find.
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    assert any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)
               for n in gm.graph.nodes)


def test_num_classes_and_structure() -> None:
    model = tinycnn(num_classes=3)
    assert model(torch.randn(8, 3, 32, 32)).shape == (8, 3)
    assert relu_count(model) == 8 * 32 * 32 + 3 * 16 * 16 * 16
    # resnet18: no maxpool, 3x3 stride-1 stem, 4 stages of 2 blocks.
    r18 = resnet18()
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18.modules())
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1)
    assert [len(stage) for stage in r18.layers] == [2, 2, 2, 2]


def test_unknown_factory_kwarg_is_rejected() -> None:
    with pytest.raises(ModelLoadError, match="widht"):
        build_model("resnet8", widht=2)


# ------------------------------------------------------------------- name specs


@pytest.mark.parametrize("spec", ["ResNet8", "resnet-8", "RESNET_8", " resnet8 "])
def test_name_spec_is_tolerant(spec: str) -> None:
    model = load_model(spec, num_classes=4)
    assert model.fc.out_features == 4
    assert relu_count(model) == 73_728


def test_wrn_name_with_dashes() -> None:
    assert isinstance(load_model("wrn-22-8", num_classes=10), nn.Module)


def test_unknown_architecture() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("resnet19")
    err = info.value
    assert "unknown architecture 'resnet19'" in err.cause
    for name in ALL_ARCHS:
        assert name in err.cause
    assert err.fix is not None and "did you mean 'resnet18'" in err.fix


# ------------------------------------------------------------------- user models

USER_MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))

def make(num_classes=10):
    return Net(num_classes)

def make_fixed():
    return Net(7)

def broken(num_classes=10):
    raise RuntimeError("boom in factory")

def not_a_model(num_classes=10):
    return {"oops": 1}

NOT_CALLABLE = 3
"""


@pytest.fixture()
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(USER_MODEL)
    return path


def test_load_from_file_passes_num_classes(user_file: Path) -> None:
    model = load_model(f"{user_file}:make", num_classes=5)
    assert isinstance(model, nn.Module)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_load_from_relative_file(user_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(user_file.parent)
    assert load_model("model.py:make", num_classes=3).fc.out_features == 3


def test_factory_without_num_classes(user_file: Path) -> None:
    assert load_model(f"{user_file}:make_fixed", num_classes=5).fc.out_features == 7


def test_load_from_module_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = f"relucomp_testpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "nets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = load_model(f"{pkg}.nets:make", num_classes=6)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)
        with pytest.raises(ModelLoadError, match="not found"):
            load_model(f"{pkg}.missing:make")
    finally:
        for name in [n for n in sys.modules if n.startswith(pkg)]:
            del sys.modules[name]


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(f"{tmp_path / 'nope.py'}:make")
    assert "nope.py" in info.value.cause and "not found" in info.value.cause


def test_file_without_factory_name(user_file: Path) -> None:
    with pytest.raises(ModelLoadError, match="names a file but no factory"):
        load_model(str(user_file))


def test_missing_factory_attribute(user_file: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(f"{user_file}:mkae")
    assert "no attribute 'mkae'" in info.value.cause
    assert "did you mean 'make'" in info.value.fix


def test_not_callable_factory(user_file: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a callable"):
        load_model(f"{user_file}:NOT_CALLABLE")


def test_factory_raises(user_file: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(f"{user_file}:broken")
    assert "raised RuntimeError: boom in factory" in info.value.cause


def test_factory_returns_non_module(user_file: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(f"{user_file}:not_a_model")
    assert "returned dict, not a torch.nn.Module" in info.value.cause


def test_file_import_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nraise ImportError('no such dep')\n")
    with pytest.raises(ModelLoadError) as info:
        load_model(f"{bad}:make")
    assert "ImportError: no such dep" in info.value.cause


# ------------------------------------------------------------------- checkpoints


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_checkpoint_round_trip(tmp_path: Path, wrap: str | None) -> None:
    torch.manual_seed(1)
    src = tinycnn(num_classes=4)
    with torch.no_grad():  # make BN running stats non-default too
        src.train()(torch.randn(8, 3, 32, 32))
    ckpt = tmp_path / "ckpt.pt"
    sd = src.state_dict()
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, ckpt)

    torch.manual_seed(2)
    fresh = load_model("tinycnn", num_classes=4)
    assert not _same_weights(src, fresh)
    loaded = load_model("tinycnn", num_classes=4, checkpoint=ckpt)
    assert _same_weights(src, loaded)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), src.eval()(x))


def test_checkpoint_dataparallel_prefix(tmp_path: Path) -> None:
    src = tinycnn()
    ckpt = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, ckpt)
    assert _same_weights(src, load_model("tinycnn", checkpoint=ckpt))


def test_checkpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("tinycnn", checkpoint=tmp_path / "absent.pt")
    assert "absent.pt" in info.value.cause and "not found" in info.value.cause


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", b"PK\x03\x04garbage"])
def test_checkpoint_corrupt(tmp_path: Path, content: bytes) -> None:
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load_model("tinycnn", checkpoint=ckpt)
    assert "corrupt or unreadable" in info.value.cause
    assert "torch.save" in info.value.fix


def test_checkpoint_truncated(tmp_path: Path) -> None:
    ckpt = tmp_path / "trunc.pt"
    torch.save(tinycnn().state_dict(), ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="corrupt or unreadable"):
        load_model("tinycnn", checkpoint=ckpt)


def test_checkpoint_pickled_module_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "whole.pt"
    torch.save(tinycnn(), ckpt)
    with pytest.raises(ModelLoadError, match="corrupt or unreadable"):
        load_model("tinycnn", checkpoint=ckpt)


def test_checkpoint_not_a_state_dict(tmp_path: Path) -> None:
    ckpt = tmp_path / "list.pt"
    torch.save([1, 2, 3], ckpt)
    with pytest.raises(ModelLoadError, match="does not hold a state_dict"):
        load_model("tinycnn", checkpoint=ckpt)


def test_checkpoint_key_mismatch(tmp_path: Path) -> None:
    sd = tinycnn().state_dict()
    sd.pop("fc.weight")
    sd["extra.weight"] = torch.zeros(1)
    ckpt = tmp_path / "keys.pt"
    torch.save(sd, ckpt)
    with pytest.raises(ModelLoadError) as info:
        load_model("tinycnn", checkpoint=ckpt)
    cause = info.value.cause
    assert "1 missing: fc.weight" in cause and "1 unexpected: extra.weight" in cause


def test_checkpoint_other_architecture(tmp_path: Path) -> None:
    ckpt = tmp_path / "r8.pt"
    torch.save(resnet8().state_dict(), ckpt)
    with pytest.raises(ModelLoadError) as info:
        load_model("tinycnn", checkpoint=ckpt)
    assert "missing:" in info.value.cause and "more)" in info.value.cause


def test_checkpoint_shape_mismatch(tmp_path: Path) -> None:
    ckpt = tmp_path / "c100.pt"
    torch.save(tinycnn(num_classes=100).state_dict(), ckpt)
    with pytest.raises(ModelLoadError) as info:
        load_model("tinycnn", num_classes=10, checkpoint=ckpt)
    assert "fc.weight (100, 16) vs model (10, 16)" in info.value.cause
    assert "num-classes" in info.value.fix
