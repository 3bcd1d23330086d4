"""Robustness evaluation: PGD in pixel space, deterministic corruptions, the report section, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from relucomp.config import resolve_config, validate
from relucomp.data import GroupedDataset
from relucomp.errors import ConfigError, DataError
from relucomp.robustness import (CORRUPTIONS, Normalized, RobustnessSettings, check_rgb_images, corrupt_images,
                                 evaluate_robustness, parse_epsilon, pgd_attack, resolve_corruptions)

from _cli import invoke, one_line_error

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
needs_ic = pytest.mark.skipif(__import__("importlib").util.find_spec("imagecorruptions") is None,
                              reason="imagecorruptions not installed (pip install 'relucomp[robust]')")


@pytest.fixture(scope="module")
def trained():
    """A tiny conv net trained to ~100% on a linearly separable 2-class image task (small margin in L∞)."""
    g = torch.Generator().manual_seed(0)
    n = 256
    x = 0.35 + 0.3 * torch.rand(n, 3, 32, 32, generator=g)
    w = torch.randn(3, 32, 32, generator=g)
    y = ((x - 0.5) * w).sum((1, 2, 3)).gt(0).long()
    images = (x * 255).round().to(torch.uint8)
    ds = GroupedDataset(images, y, (torch.arange(n) % 2), group_names=["a", "b"], class_names=["0", "1"],
                        mean=MEAN, std=STD)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32 * 32, 2))
    model = Normalized(net, MEAN, STD)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x01 = images.float() / 255
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x01), y).backward()
        opt.step()
    net.eval()
    return net, ds, x01, y


def test_pgd_raises_loss_lowers_accuracy_and_respects_epsilon(trained):
    net, _, x01, y = trained
    model = Normalized(net, MEAN, STD).eval()
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x01), y).item()
        clean_acc = model(x01).argmax(1).eq(y).float().mean().item()
    assert clean_acc > 0.9
    eps = 8 / 255
    adv = pgd_attack(model, x01, y, epsilon=eps, step=2 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adv_loss = F.cross_entropy(model(adv), y).item()
        adv_acc = model(adv).argmax(1).eq(y).float().mean().item()
    assert adv_loss > clean_loss + 0.5 and adv_acc < clean_acc - 0.5, (clean_loss, adv_loss, clean_acc, adv_acc)
    assert (adv - x01).abs().max().item() <= eps + 1e-6  # ‖δ‖∞ ≤ ε in pixel space
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    # at the image border the clip is active: an image at 1.0 cannot go above it
    bright = torch.ones(4, 3, 32, 32)
    advb = pgd_attack(model, bright, y[:4], epsilon=eps, step=2 / 255, steps=3)
    assert advb.max().item() <= 1.0 and advb.min().item() >= 1 - eps - 1e-6
    # a random start alone (0 steps) is far weaker than the attack: the gradient does the work
    rand = pgd_attack(model, x01, y, epsilon=eps, steps=0, generator=torch.Generator().manual_seed(0))
    assert model(rand).argmax(1).eq(y).float().mean().item() > adv_acc + 0.3
    assert all(p.requires_grad for p in net.parameters())  # restored


@needs_ic
def test_corruptions_deterministic_per_seed_and_batch_independent():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for name in ("gaussian_noise", "impulse_noise", "fog", "contrast"):
        np.random.seed(123)
        before = np.random.get_state()[1].copy()
        a = corrupt_images(x, name, 3, seed=7, cache=False)
        assert np.array_equal(np.random.get_state()[1], before)  # the caller's numpy RNG is restored
        assert torch.equal(a, corrupt_images(x, name, 3, seed=7, cache=False))
        assert torch.equal(a[2:], corrupt_images(x[2:], name, 3, seed=7, indices=[2, 3, 4], cache=False))
        assert a.dtype == torch.uint8 and a.shape == x.shape and not torch.equal(a, x)
    assert not torch.equal(corrupt_images(x, "gaussian_noise", 3, seed=7), corrupt_images(x, "gaussian_noise", 3, seed=8))
    # stronger severity, further from the clean image
    d1 = (corrupt_images(x, "gaussian_noise", 1).float() - x.float()).abs().mean()
    d5 = (corrupt_images(x, "gaussian_noise", 5).float() - x.float()).abs().mean()
    assert d5 > d1


@needs_ic
def test_corruption_memo_returns_exact_private_copies(monkeypatch):
    import relucomp.robustness as rb
    monkeypatch.setattr(rb, "_MEMO", rb._CorruptionMemo(max_bytes=2 * 5 * 3 * 32 * 32))   # room for two sets
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    a = corrupt_images(x, "fog", 2, seed=3)
    assert rb._MEMO.hits == 0
    b = corrupt_images(x, "fog", 2, seed=3)
    assert rb._MEMO.hits == 1 and torch.equal(a, b) and torch.equal(a, corrupt_images(x, "fog", 2, seed=3, cache=False))
    b.zero_()                                           # a caller's edit does not reach the memo
    assert torch.equal(corrupt_images(x, "fog", 2, seed=3), a)
    y = x.clone(); y[0, 0, 0, 0] ^= 1                   # other pixels, other indices, other seed: misses
    for call in (lambda: corrupt_images(y, "fog", 2, seed=3), lambda: corrupt_images(x, "fog", 2, seed=4),
                 lambda: corrupt_images(x, "fog", 2, seed=3, indices=[9, 1, 2, 3, 4])):
        hits = rb._MEMO.hits
        call()
        assert rb._MEMO.hits == hits
    assert rb._MEMO.size <= rb._MEMO.max_bytes and len(rb._MEMO.items) == 2     # bounded: oldest out


@needs_ic
def test_evaluate_robustness_numbers_and_groups(trained):
    net, ds, _, _ = trained
    s = RobustnessSettings.make(corruptions="gaussian_noise,contrast", severities="1,5", samples=100, pgd_steps=5)
    res = evaluate_robustness({"m": net}, ds, s)
    m = res.models["m"]
    assert res.samples == 100 and set(m.npa_by_corruption) == {"gaussian_noise", "contrast"}
    assert set(m.npa_by_severity) == {"1", "5"}
    for v in (m.ca, m.npa, m.adva, *m.npa_by_corruption.values()):
        assert 0.0 <= v <= 100.0
    assert m.ca > 90 and m.adva < m.ca - 50
    assert m.npa == pytest.approx(np.mean(list(m.npa_by_corruption.values())))
    assert set(m.groups) == {"a", "b"} and sum(res.group_counts.values()) == 100
    assert all(0 <= m.groups[g][k] <= 100 for g in m.groups for k in ("ca", "npa", "adva"))
    back = type(res).from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.models["m"].adva == m.adva


def test_bad_inputs_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="use --pgd-epsilon 8/255"):
        parse_epsilon(8)
    with pytest.raises(ConfigError, match="use --pgd-epsilon 8/255"):
        parse_epsilon("8")
    assert parse_epsilon("8/255") == pytest.approx(8 / 255) and parse_epsilon(0.01) == 0.01
    with pytest.raises(ConfigError, match="unknown corruption 'fogg'") as e:
        resolve_corruptions("gaussian_noise,fogg")
    assert "jpeg_compression" in e.value.fix and "noise" in e.value.fix
    assert resolve_corruptions("all") == CORRUPTIONS and resolve_corruptions("noise") == CORRUPTIONS[:3]
    with pytest.raises(ConfigError, match="severities"):
        RobustnessSettings.make(severities=[0, 6])
    with pytest.raises(DataError, match="greyscale"):
        check_rgb_images(torch.full((4, 3, 32, 32), 7, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="pgd_epsilon|--pgd-epsilon"):
        validate(resolve_config(None, {"relu_budget": 100, "eval_robustness": True, "pgd_epsilon": 8}))
    with pytest.raises(ConfigError, match="image-size 32"):
        validate(resolve_config(None, {"relu_budget": 100, "eval_robustness": True, "image_size": 16}))


@pytest.mark.parametrize("args, fragments", [
    (["--pgd-epsilon", "8"], ["--pgd-epsilon '8' is in 0-255 units", "use --pgd-epsilon 8/255"]),
    (["--corruptions", "fogg"], ["unknown corruption 'fogg'", "gaussian_noise"]),
    (["--severities", "0,9"], ["severities [0, 9] must be among 1-5"]),
    (["--robust", "--train-attack", "fgsm"], ["unknown training attack 'fgsm'", "trades | pgd"]),
    (["--robustness-split", "train"], ["must be test or val, not 'train'", "--robustness-split val"]),
])
def test_cli_refuses_bad_robustness_options_before_any_data(args, fragments, tmp_path, monkeypatch):
    import relucomp.data.load as load

    monkeypatch.setattr(load, "load_data", lambda *a, **k: pytest.fail("data loaded before validation"))
    r = invoke(["compile", "tinycnn", "-b", "2k", "--out", str(tmp_path / "o"), "--eval-robustness", *args])
    one_line_error(r, *fragments)
    assert not (tmp_path / "o").exists()


def test_cli_refuses_greyscale_folder_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    import relucomp.data.load as load

    for c in ("cat", "dog"):
        (tmp_path / "grey" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8), mode="L").save(tmp_path / "grey" / c / f"{i}.png")
    monkeypatch.setattr(load, "load_data", lambda *a, **k: pytest.fail("data loaded before validation"))
    r = invoke(["compile", "tinycnn", "-b", "2k", "--data", f"folder:{tmp_path / 'grey'}",
                            "--out", str(tmp_path / "o"), "--eval-robustness"])
    one_line_error(r, "greyscale image (mode L)", "RGB")


@needs_ic
def test_compile_eval_robustness_report_html_and_evaluate_command(tmp_path):
    out = tmp_path / "o"
    quick = ["--limit", "300", "--pretrain-epochs", "0", "--epochs", "1", "--finetune-epochs", "1", "--no-progress"]
    r = invoke(["compile", "tinycnn", "-b", "50%", "--out", str(out), *quick, "--eval-robustness",
                            "--corruptions", "gaussian_noise,contrast", "--severities", "1,5",
                            "--robustness-samples", "40", "--pgd-steps", "2"])
    assert r.exit_code == 0, r.output
    assert "robustness" in r.output and "AdvA" in r.output
    rep = json.loads((out / "report.json").read_text())
    rb = rep["robustness"]
    assert rb["samples"] == 40 and rb["settings"]["corruptions"] == ["gaussian_noise", "contrast"]
    assert rb["settings"]["pgd_epsilon"] == pytest.approx(8 / 255)
    for model in ("dense", "compiled"):
        m = rb["models"][model]
        assert all(0.0 <= m[k] <= 100.0 for k in ("ca", "npa", "adva"))
        assert set(m["groups"]) == set(rep["group_accuracy"]["groups"])
    assert "robustness" in rep["phases_seconds"]
    from relucomp.report import render_report

    html = render_report(out).read_text()
    assert "Robustness: clean, corrupted and adversarial accuracy" in html and "NPA per corruption" in html

    before = dict(rep)
    r = invoke(["evaluate", str(out), "--corruptions", "fog", "--severities", "2",
                            "--robustness-samples", "30", "--pgd-steps", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["robustness"]["settings"]["corruptions"] == ["fog"] and rep2["robustness"]["samples"] == 30
    assert {k: v for k, v in rep2.items() if k != "robustness"} == {k: v for k, v in before.items() if k != "robustness"}
    # the rebuilt compiled model is the compiled model: same clean accuracy on the same images as in the compile
    r = invoke(["evaluate", str(out), "--corruptions", "gaussian_noise,contrast", "--severities", "1,5",
                            "--robustness-samples", "40", "--pgd-steps", "2", "--no-progress"])
    rep3 = json.loads((out / "report.json").read_text())
    for model in ("dense", "compiled"):
        assert rep3["robustness"]["models"][model]["ca"] == pytest.approx(rb["models"][model]["ca"])
        assert rep3["robustness"]["models"][model]["npa"] == pytest.approx(rb["models"][model]["npa"])
    # --robustness-split val: the validation split (for tuning), recorded in the section
    splits = {k: v["n"] for k, v in rep["data"]["summary"]["splits"].items()}
    assert splits["val"] != splits["test"] and rb["settings"]["split"] == "test"
    r = invoke(["evaluate", str(out), "--robustness-split", "val", "--corruptions", "fog", "--severities",
                            "2", "--robustness-samples", "100000", "--pgd-steps", "1", "--no-progress", "--no-dense"])
    assert r.exit_code == 0, r.output
    rv = json.loads((out / "report.json").read_text())["robustness"]
    assert rv["settings"]["split"] == "val" and rv["samples"] == splits["val"] and set(rv["models"]) == {"compiled"}
    one_line_error(invoke(["evaluate", str(tmp_path)]), "not a finished relucomp compile output")
