import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from relucomp.metrics import EMA, fairness_report, group_accuracy, predict

NAMES = ["a", "b", "c", "empty"]


def hand_made():
    """20 samples in 3 groups (+ an empty 4th), predictions built to known accuracies.

    group a: 10 samples, dense 9 correct, compiled 7 correct
    group b:  5 samples, dense 5 correct, compiled 3 correct
    group c:  5 samples, dense 4 correct, compiled 4 correct
    """
    groups = np.array([0] * 10 + [1] * 5 + [2] * 5)
    y = np.arange(20) % 3
    wrong = (y + 1) % 3
    dense = y.copy()
    comp = y.copy()
    dense[[0]] = wrong[[0]]                    # a: 9/10
    comp[[0, 1, 2]] = wrong[[0, 1, 2]]         # a: 7/10
    comp[[10, 11]] = wrong[[10, 11]]           # b: 3/5 (dense 5/5)
    dense[[15]] = wrong[[15]]                  # c: 4/5
    comp[[16]] = wrong[[16]]                   # c: 4/5
    return y, dense, comp, groups


def test_fairness_report_hand_computed():
    y, dense, comp, groups = hand_made()
    r = fairness_report(y, dense, comp, groups, NAMES, n_boot=0)
    # by hand: overall dense 18/20 = 90, compiled 14/20 = 70, Δ = 20
    assert r["overall"]["acc_dense"] == pytest.approx(90.0)
    assert r["overall"]["acc_compiled"] == pytest.approx(70.0)
    assert r["overall"]["delta"] == pytest.approx(20.0)
    # Δ_g: a 90-70=20, b 100-60=40, c 80-80=0 ; ψ_g = Δ_g - Δ: 0, 20, -20
    exp = {"a": (90, 70, 20, 0), "b": (100, 60, 40, 20), "c": (80, 80, 0, -20)}
    for name, (ad, ac, dg, psi) in exp.items():
        g = r["groups"][name]
        assert g["acc_dense"] == pytest.approx(ad)
        assert g["acc_compiled"] == pytest.approx(ac)
        assert g["delta"] == pytest.approx(dg)
        assert g["psi"] == pytest.approx(psi)
    assert r["groups"]["a"]["count"] == 10 and r["groups"]["b"]["count"] == 5
    assert r["psi_pw"] == pytest.approx(40.0)
    assert r["max_psi"] == pytest.approx(20.0)
    assert r["min_psi"] == pytest.approx(-20.0)
    assert r["argmax_psi"] == "b"
    # error ratios: compiled overall err 30 -> a 30/30, b 40/30, c 20/30 ; dense err 10 -> a 1, b 0, c 2
    assert r["groups"]["b"]["error_ratio_compiled"] == pytest.approx(4 / 3)
    assert r["groups"]["c"]["error_ratio_dense"] == pytest.approx(2.0)
    assert r["worst_group_error_ratio"]["compiled"] == pytest.approx(4 / 3)
    assert r["worst_group_error_ratio"]["dense"] == pytest.approx(2.0)
    assert r["ci"] is None
    json.dumps(r, allow_nan=False)


def test_empty_group_reported_with_none():
    y, dense, comp, groups = hand_made()
    r = fairness_report(y, dense, comp, groups, NAMES, n_boot=50)
    e = r["groups"]["empty"]
    assert e["count"] == 0
    assert all(e[k] is None for k in e if k != "count")
    assert all(v is None for v in r["ci"]["groups"]["empty"].values())
    json.dumps(r, allow_nan=False)  # no NaN / inf anywhere


def test_error_ratio_guard_perfect_accuracy():
    y = np.array([0, 1, 0, 1])
    g = np.array([0, 0, 1, 1])
    r = fairness_report(y, y, y, g, ["x", "y"], n_boot=20)
    assert r["overall"]["acc_compiled"] == 100.0
    assert r["worst_group_error_ratio"] == {"dense": None, "compiled": None}
    assert r["groups"]["x"]["error_ratio_compiled"] is None
    assert r["psi_pw"] == 0.0
    json.dumps(r, allow_nan=False)


def test_bootstrap_ci_contains_point_and_is_seeded():
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 4, n)
    g = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    dense = np.where(rng.random(n) < 0.9, y, (y + 1) % 4)
    comp = np.where(rng.random(n) < 0.85, dense, (y + 2) % 4)
    r = fairness_report(y, dense, comp, g, ["g0", "g1", "g2"], n_boot=200, seed=3)
    ci = r["ci"]
    for k in ("acc_dense", "acc_compiled", "delta"):
        lo, hi = ci["overall"][k]
        assert lo <= r["overall"][k] <= hi
    for name in ("g0", "g1", "g2"):
        for k in ("acc_dense", "acc_compiled", "delta", "psi"):
            lo, hi = ci["groups"][name][k]
            assert lo <= r["groups"][name][k] <= hi, (name, k)
    lo, hi = ci["psi_pw"]
    assert lo <= hi
    r2 = fairness_report(y, dense, comp, g, ["g0", "g1", "g2"], n_boot=200, seed=3)
    assert r2["ci"] == ci


def test_group_accuracy_table():
    y, dense, comp, groups = hand_made()
    t = group_accuracy(y, comp, groups, NAMES, n_boot=30, seed=0)
    assert list(t.index) == NAMES + ["overall"]
    assert t.loc["a", "accuracy"] == pytest.approx(70.0)
    assert t.loc["b", "accuracy"] == pytest.approx(60.0)
    assert t.loc["b", "error"] == pytest.approx(40.0)
    assert t.loc["c", "count"] == 5
    assert t.loc["empty", "count"] == 0 and math.isnan(t.loc["empty", "accuracy"])
    assert t.loc["overall", "accuracy"] == pytest.approx(70.0)
    assert t.loc["overall", "count"] == 20
    for name in ("a", "b", "c", "overall"):
        assert t.loc[name, "acc_ci_low"] <= t.loc[name, "accuracy"] <= t.loc[name, "acc_ci_high"]
    t0 = group_accuracy(torch.tensor(y), torch.tensor(comp), torch.tensor(groups), n_boot=None)
    assert "acc_ci_low" not in t0.columns and list(t0.index) == ["0", "1", "2", "overall"]


def test_group_index_out_of_names_raises():
    with pytest.raises(ValueError):
        fairness_report([0, 1], [0, 1], [0, 1], [0, 5], ["a", "b"])


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_ema_equals_manual_average():
    model = _bn_model()
    d = 0.8
    ema = EMA(model, decay=d)
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        x = torch.randn(8, 3, 6, 6)
        loss = model(x).pow(2).mean()  # train mode: BN running stats change too
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    k = len(snaps) - 1
    avg = ema.averaged_model().state_dict()
    for key, v0 in snaps[0].items():
        if not v0.dtype.is_floating_point:
            assert torch.equal(avg[key], snaps[-1][key])  # num_batches_tracked copied
            continue
        manual = d**k * v0 + sum((1 - d) * d ** (k - i) * snaps[i][key] for i in range(1, k + 1))
        assert torch.allclose(avg[key], manual, atol=1e-6), key
    target = _bn_model()
    ema.copy_to(target)
    for key, v in target.state_dict().items():
        assert torch.equal(v, avg[key])
    assert not ema.averaged_model().training
    assert ema.num_updates == 4


def test_predict_helper_restores_mode():
    model = _bn_model()
    model.train()
    x = torch.randn(10, 3, 6, 6)
    y = torch.randint(0, 3, (10,))
    g = torch.randint(0, 2, (10,))
    ds = torch.utils.data.TensorDataset(x, y, g)
    yt, yp, gr = predict(model, ds, batch_size=4)
    assert model.training
    model.eval()
    with torch.no_grad():
        exp = model(x).argmax(1).numpy()
    assert np.array_equal(yp, exp) and np.array_equal(yt, y.numpy()) and np.array_equal(gr, g.numpy())
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    assert np.array_equal(predict(model, loader)[1], exp)


def test_fairness_report_point_estimates_come_from_metricframe(monkeypatch):
    import fairlearn.metrics as flm
    import numpy as np

    from relucomp.metrics import fairness_report

    calls = []
    real = flm.MetricFrame

    class Spy(real):
        def __init__(self, *a, **k):
            calls.append(k.get("n_boot"))
            super().__init__(*a, **k)

    monkeypatch.setattr(flm, "MetricFrame", Spy)
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    pd_ = np.array([0, 1, 1, 0, 1, 0, 1, 0])
    pc = np.array([0, 1, 0, 0, 1, 1, 1, 0])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    rep = fairness_report(y, pd_, pc, g, ["a", "b"], n_boot=0)
    assert len(calls) == 2 and rep["source"].startswith("fairlearn.MetricFrame")
    assert rep["groups"]["a"]["acc_dense"] == 100.0 and rep["groups"]["a"]["acc_compiled"] == 75.0
    assert rep["groups"]["b"]["acc_dense"] == 75.0 and rep["groups"]["b"]["acc_compiled"] == 50.0
