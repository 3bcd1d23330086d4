"""Multi-process training (relucomp.distributed): 2 CPU processes (gloo) against 1, a killed rank, the errors.

The end-to-end runs compile tinycnn on the synthetic data (--limit) with the same global batch and seed:
once on one process (the reference), once with ``relucomp compile --nproc 2`` (it starts torchrun), and
once under ``torchrun --nproc_per_node 2`` with rank 1 killed (SIGKILL) in the second finetune epoch,
then resumed from the checkpoint on one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relucomp import distributed
from relucomp.config import resolve_config, validate
from relucomp.errors import ConfigError, RelucompError
from relucomp.loaders import BatchLoader

BUDGET = 2000
# channel gates: with pixel gates on this 18-step schedule ~1 % of the 20,480 entries flip between process counts
# (the gates' Adam takes sign-like steps, so float summation order decides near-zero gradients); see README
ARGS = ["tinycnn", "--data", "synthetic", "--limit", "400", "--relu-budget", str(BUDGET), "--granularity", "channel",
        "--pretrain-epochs", "1", "--epochs", "2", "--finetune-epochs", "2", "--batch-size", "32", "--seed", "0",
        "--fair-groups", "group", "--no-progress"]  # CEAG constraints in the finetune


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARS}
    env.update(RELUCOMP_CACHE="off", OMP_NUM_THREADS="1", RELUCOMP_DIST_TIMEOUT="60", **extra)
    return env


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300)


def _compile(out: Path, *extra: str, export: bool = True, **env) -> subprocess.CompletedProcess:
    cfg = []
    if not export:  # model.pt only (faster): the reference and the resumed run
        path = out.parent / f"{out.name}-noexport.toml"
        path.write_text("[export]\nenabled = false\n")
        cfg = ["--config", str(path)]
    return _run([sys.executable, "-m", "relucomp", "compile", *ARGS, "--out", str(out), *cfg, *extra], **env)


def _masks(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _test_acc(out: Path) -> float:
    return float(_report(out)["accuracy"]["after"]["test"])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    r = _compile(out, export=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_processes_equal_one(single, tmp_path):
    out = tmp_path / "two"
    r = _compile(out, "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = _masks(single), _masks(out)
    assert m1.keys() == m2.keys() and m1
    differing = sum(int((m1[k] != m2[k]).sum()) for k in m1)
    assert differing == 0, f"{differing} gate entries differ between 1 and 2 processes"
    assert abs(_test_acc(single) - _test_acc(out)) <= 0.5
    from relucomp.onnx_graph import walk

    assert walk(out / "model.onnx")["relus"] <= BUDGET
    rep = _report(out)
    assert rep["config"]["runtime"]["nproc"] == 2
    # CEAG: the same replay statistics and dual steps as one process (global batch gathered on every rank)
    t1, t2 = _report(single)["fairness"]["multiplier_trajectory"], rep["fairness"]["multiplier_trajectory"]
    assert len(t1) == len(t2) >= 2 and any(any(m > 0 for m in r["multipliers"]) for r in t1)
    for a, b in zip(t1, t2):
        assert a["step"] == b["step"]
        assert a["multipliers"] == pytest.approx(b["multipliers"], abs=1e-6)
        assert a["psi_replay"] == pytest.approx(b["psi_replay"], abs=1e-4)
    assert not (out / "checkpoint.pt").exists()


def test_killed_rank_then_resume_on_one_process(single, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "relucomp",
           "compile", *ARGS, "--out", str(out)]
    # rank 1 dies (SIGKILL) at finetune step 12: the second epoch (≈ 10 batches of 32 per epoch)
    r = _run(cmd, RELUCOMP_FAULT="finetune:1:12")
    assert r.returncode != 0
    log = r.stdout + r.stderr
    assert "RELUCOMP_FAULT: killing this process during finetune" in log
    assert "failed" in log.lower() or "another process stopped answering" in log  # torchrun's or ours
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["phase"] == "finetune" and ck["epoch"] == 1  # the last epoch-end checkpoint, written by rank 0
    assert not (out / "report.json").exists()
    r = _compile(out, "--resume", export=False)  # one process
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = _masks(single), _masks(out)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert abs(_test_acc(single) - _test_acc(out)) <= 0.5
    assert not (out / "checkpoint.pt").exists()


# --------------------------------------------------------------------------- errors, before any work

def test_half_set_torchrun_variables(monkeypatch):
    for k in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    assert distributed.torchrun_env() is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.DistributedError, match="half set: RANK, WORLD_SIZE set but LOCAL_RANK, "
                                                             "MASTER_ADDR, MASTER_PORT missing") as e:
        validate(resolve_config(None, {"relu_budget": "2k"}))
    assert "torchrun" in e.value.fix


def test_half_set_variables_cli(tmp_path):
    r = _run([sys.executable, "-m", "relucomp", "compile", "--relu-budget", "2k", "--out", str(tmp_path / "o")],
             WORLD_SIZE="2")
    assert r.returncode == 2
    assert "torchrun variables half set" in r.stderr and "fix:" in r.stderr
    assert not (tmp_path / "o").exists()


def test_batch_not_divisible_and_fp16_on_cpu(monkeypatch):
    for k in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="--batch-size 33 is not divisible by the 2 processes") as e:
        validate(resolve_config(None, {"relu_budget": "2k", "nproc": 2, "batch_size": 33}))
    assert "--batch-size 32" in e.value.fix
    with pytest.raises(ConfigError, match="--amp fp16 on --device cpu"):
        validate(resolve_config(None, {"relu_budget": "2k", "amp": "fp16"}))
    with pytest.raises(ConfigError, match="unknown mixed precision 'fp8'"):
        validate(resolve_config(None, {"relu_budget": "2k", "amp": "fp8"}))
    validate(resolve_config(None, {"relu_budget": "2k", "amp": "bf16", "nproc": 2, "batch_size": 64}))
    # the library does not start processes itself
    import relucomp

    with pytest.raises(RelucompError, match="outside torchrun"):
        relucomp.compile("tinycnn", relu_budget="2k", nproc=2, batch_size=64, limit=200)


def test_loader_shards_partition_each_global_batch(monkeypatch):
    """Rank r of W yields rows [r·B/W, (r+1)·B/W) of the global batch; same draws on every rank."""
    from relucomp.data import load_data

    ds = load_data("synthetic", limit=200, seed=0).train
    full = BatchLoader(ds, batch_size=24, shuffle=True, augment=True, seed=3)
    ref = [b for b in full]
    parts = []
    for r in range(2):
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        ld = BatchLoader(ds, batch_size=24, shuffle=True, augment=True, seed=3)
        with ld.sharded():
            parts.append([b for b in ld])
        assert torch.equal(ld.generator.get_state(), full.generator.get_state())  # the single-process stream
    assert len(parts[0]) == len(parts[1]) == len(ref)
    for (x0, y0, g0), (x1, y1, g1), (x, y, g) in zip(parts[0], parts[1], ref):
        assert abs(x0.shape[0] - x1.shape[0]) <= 1
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert torch.equal(torch.cat([g0, g1]), g)


def test_bf16_autocast_keeps_gates_and_losses_fp32(make_gated):
    """``amp = bf16`` (CPU autocast): the step runs in bf16, parameters (gates too) and the KD term stay fp32."""
    from relucomp.models import build_model
    from relucomp.train import RuntimeOptions, ce_kd_step, kd_loss, make_optimizer, runtime_options, train_loop

    torch.manual_seed(0)
    gm, _ = make_gated(build_model("tinycnn"), "channel")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    seen = []

    def step(model, xb, yb, g):
        loss, logits = ce_kd_step(None)(model, xb, yb, g)
        seen.append((logits.dtype, kd_loss(logits, logits.detach() + 1).dtype))
        return loss, logits

    with runtime_options(RuntimeOptions(amp="bf16")):
        hist = train_loop(gm, [(x, y)] * 2, epochs=1, optimizer=make_optimizer(gm.parameters(), lr=0.01), step_fn=step)
    assert seen == [(torch.bfloat16, torch.float32)] * 2
    assert all(p.dtype == torch.float32 for p in gm.parameters())
    assert torch.isfinite(torch.tensor(hist[0]["loss"]))
    changed = [k for k, v in gm.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("alpha") for k in changed) and any(k.endswith("conv1.weight") for k in changed)


def test_lost_peer_is_a_clear_error(monkeypatch):
    """A collective that fails because a peer died becomes one error line with the fix; other errors pass through."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with pytest.raises(distributed.DistributedError, match="rank 1: another process stopped answering during finetune") as e:
        with distributed.collective("finetune"):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert "--resume" in e.value.fix
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with distributed.collective("finetune"):
            raise RuntimeError("shape mismatch")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match="--nproc given inside a torchrun launch"):
        distributed.launch(2, ["compile"])
