"""Shared fixtures for the compiler-core tests (small models, no ~/.cache)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import fx, nn

# The test machine has 2 CPU cores shared by several test runs: with 2 intra-op
# threads, OpenMP spin-waiting under contention made small training loops ~10x
# slower than with 1 (measured: 18.8 s vs 2.2 s).  Override with RELUCOMP_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("RELUCOMP_TEST_THREADS", "1")))


@pytest.fixture
def rc_cache(tmp_path, monkeypatch):
    """Point relucomp's cache (pretrained models) at a fresh temporary folder."""
    path = tmp_path / "relucomp-cache"
    monkeypatch.setenv("RELUCOMP_CACHE", str(path))
    return path


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


@pytest.fixture
def random_bn():
    """The :func:`randomize_bn` helper (BN running stats / affine made non-trivial)."""
    return randomize_bn


@pytest.fixture
def make_gated():
    """``make_gated(model, granularity, size=32)`` -> (gated GraphModule, calibration batch)."""
    from relucomp.infra import PassManager
    from relucomp.ir import trace
    from relucomp.passes.canonicalize import CanonicalizeReLUPass
    from relucomp.passes.insert_gates import InsertGatesPass
    from relucomp.passes.shape_prop import ShapeAnalysisPass

    def build(model: nn.Module, granularity: str = "pixel", size: int = 32, seed: int = 0) -> tuple[fx.GraphModule, torch.Tensor]:
        torch.manual_seed(seed)
        randomize_bn(model, seed)
        model.eval()
        x = torch.randn(4, 3, size, size)
        gm = trace(model)
        pm = PassManager([CanonicalizeReLUPass(), ShapeAnalysisPass(x[:1]), InsertGatesPass(granularity)],
                         calibration=x)
        gm = pm.run(gm).gm.eval()
        return gm, x

    return build


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end compile runs (seconds each)")
