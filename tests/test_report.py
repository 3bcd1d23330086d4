"""Budget sweeps (relucomp.sweep) and the HTML report (relucomp.report).

* rendering from fake sweep / compile directories: every PNG referenced,
  valid, non-trivial, not blank; tables hold the JSON's numbers; ``--inline``;
* SNLSearchPass snapshots (one per budget, soft gates, resume-safe);
* one real tiny sweep (tinycnn, synthetic, 2 budgets, 1 epoch) interrupted
  after the first budget and continued: done runs are skipped;
* option mismatch / fair_method fallback (fake compile, instant);
* the report opened in headless chromium (skipped when it is not installed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from relucomp.errors import RelucompError
from relucomp.metrics import fairness_report
from relucomp.report import FALLBACK_LABEL, collect, pi_latency, render_report

GROUPS = ["A", "B", "C"]
COUNTS = {"A": 140, "B": 40, "C": 20}
LAYERS = [("relu1", [8, 32, 32], 8192), ("relu2", [16, 16, 16], 4096), ("block.relu1", [16, 16, 16], 4096),
          ("block.relu2", [16, 16, 16], 4096)]
TOTAL = sum(n for _, _, n in LAYERS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- fake reports

def _predictions(budget: int, method: str, seed: int):
    """Dense / compiled predictions whose accuracy drops with the budget, more for the minorities."""
    rng = np.random.default_rng(seed)
    y, g, pd_, pc = [], [], [], []
    for gi, name in enumerate(GROUPS):
        n = COUNTS[name]
        yy = rng.integers(0, 10, n)
        dense_acc = [0.92, 0.85, 0.80][gi]
        drop = (1 - budget / TOTAL) * [0.05, 0.15, 0.30][gi] * (0.5 if method == "ceag" else 1.0)
        ok_d = rng.random(n) < dense_acc
        ok_c = ok_d & (rng.random(n) > drop)
        y.append(yy), g.append(np.full(n, gi))
        pd_.append(np.where(ok_d, yy, (yy + 1) % 10)), pc.append(np.where(ok_c, yy, (yy + 1) % 10))
    return [np.concatenate(a) for a in (y, pd_, pc, g)]


def fake_report(budget: int, method: str | None, *, seed: int = 0, fairness: bool = True) -> dict:
    y, pd_, pc, g = _predictions(budget, method or "nft", seed)
    acc = lambda p, m: float(100 * np.mean(p[m] == y[m]))  # noqa: E731
    allm = np.ones_like(y, dtype=bool)
    kept = [max(1, int(n * budget / TOTAL)) for _, _, n in LAYERS]
    kept[0] += budget - sum(kept)
    rep = {
        "relucomp_version": "0.1.0", "model": "tinycnn",
        "data": {"name": "synthetic", "spec": "synthetic", "target": "label", "group_attribute": "group"},
        "options": {"relu_budget": budget, "granularity": "pixel", "search": "snl", "search_epochs": 1,
                    "finetune_epochs": 1},
        "relus": {"before": TOTAL, "after": budget, "budget": budget},
        "per_layer": [{"site": s, "shape": sh, "relus_before": n, "relus_after": k}
                      for (s, sh, n), k in zip(LAYERS, kept)],
        "accuracy": {"before": {"val": 80.0, "test": acc(pd_, allm)}, "after": {"val": 70.0, "test": acc(pc, allm)}},
        "group_accuracy": {"groups": GROUPS, "before": {n: acc(pd_, g == i) for i, n in enumerate(GROUPS)},
                           "after": {n: acc(pc, g == i) for i, n in enumerate(GROUPS)}, "test_counts": COUNTS},
        "phases_seconds": {"search": 1.0, "finetune": 2.0},
        "export": {"onnx_relus": budget, "ort_max_abs_diff": 1.5e-7},
    }
    if fairness:
        fr = fairness_report(y, pd_, pc, g, GROUPS, n_boot=50, seed=seed)
        rep["fairness"] = {"method": method or "nft", "tolerance": 2.0, "groups": GROUPS,
                           "results": {"last": {"test": fr}}}
    return rep


def make_fake_sweep(root: Path, budgets=(10000, 5000, 2000), methods=("nft", "ceag")) -> Path:
    runs = {}
    for b in budgets:
        for m in methods:
            name = f"{b}-{m}"
            d = root / "runs" / name
            d.mkdir(parents=True)
            (d / "report.json").write_text(json.dumps(fake_report(b, m, seed=b % 97)))
            runs[name] = {"status": "done", "dir": f"runs/{name}", "budget": b, "method": m}
    state = {"format": "relucomp-sweep-v1", "options": {"budgets": list(budgets), "methods": list(methods)},
             "searches": {"shared": {"snapshots": {str(b): {"step": 3, "soft_relus": b - 1, "reached": True}
                                                   for b in budgets}}},
             "runs": runs, "complete": True}
    (root / "sweep.json").write_text(json.dumps(state))
    return root


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(html_path: Path) -> _Page:
    p = _Page()
    p.feed(html_path.read_text(encoding="utf-8"))
    return p


def check_png(path_or_bytes) -> None:
    from PIL import Image
    import io

    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    assert len(raw) > 5_000, f"figure too small ({len(raw)} bytes)"
    img = Image.open(io.BytesIO(raw))
    img.verify()
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    assert img.width >= 300 and img.height >= 200
    a = np.asarray(img, dtype=np.float32)
    assert a.std() > 10, "blank figure"
    assert (a.reshape(-1, 3).max(1) - a.reshape(-1, 3).min(1) > 60).mean() > 0.0005, "no coloured marks"


def check_html_figures(html_path: Path) -> _Page:
    page = parse(html_path)
    figs = sorted(p.name for p in (html_path.parent / "figures").glob("*.png"))
    assert len(figs) == 5
    srcs = sorted(Path(s).name for s in page.imgs)
    assert srcs == figs, "the HTML must reference every PNG (and only those)"
    for s in page.imgs:
        assert not Path(s).is_absolute() and (html_path.parent / s).exists()
        check_png(html_path.parent / s)
    return page


# --------------------------------------------------------------------------- rendering

@pytest.fixture(scope="module")
def fake_sweep_html(tmp_path_factory) -> Path:
    """A fake 3-budget x 2-method sweep, rendered once (ψ bars at 5k) for the tests below."""
    root = make_fake_sweep(tmp_path_factory.mktemp("fake") / "sw")
    html = render_report(root, budget="5k")
    assert html == root / "report.html"
    return html


def test_report_from_fake_sweep(fake_sweep_html):
    html = fake_sweep_html
    root = html.parent
    page = check_html_figures(html)
    cells = set(page.cells)
    for name in ("10000-nft", "5000-ceag", "2000-nft"):
        rep = json.loads((root / "runs" / name / "report.json").read_text())
        assert f"{rep['relus']['after']:,}" in cells
        assert f"{rep['accuracy']['after']['test']:.2f}" in cells
        assert f"{rep['accuracy']['before']['test']:.2f}" in cells
        for gname, v in rep["group_accuracy"]["after"].items():
            assert f"{v:.2f}" in cells, (name, gname)
        fr = rep["fairness"]["results"]["last"]["test"]
        assert f"{fr['max_psi']:.2f}" in cells and f"{fr['psi_pw']:.2f}" in cells
        lat, label = pi_latency(rep["relus"]["after"], rep, run_dir=root / "runs" / name)
        assert label.startswith("estimated") and f"{lat:.2f}" in cells and label in cells
    # ψ_g table at the chosen budget: every group's ψ and CI, for both methods
    for m in ("nft", "ceag"):
        fr = json.loads((root / "runs" / f"5000-{m}" / "report.json").read_text())["fairness"]["results"]["last"]["test"]
        for gname, row in fr["groups"].items():
            assert f"{row['psi']:+.2f}" in cells
            lo, hi = fr["ci"]["groups"][gname]["psi"]
            assert f"[{lo:+.2f}, {hi:+.2f}]" in cells
    # per-layer table: dense and kept counts
    rep = json.loads((root / "runs" / "2000-nft" / "report.json").read_text())
    for layer in rep["per_layer"]:
        assert layer["site"] in cells and f"{layer['relus_before']:,}" in cells
        assert f"{layer['relus_after']:,} ({100 * layer['relus_after'] / layer['relus_before']:.1f}%)" in cells
    assert "ψ_g" in html.read_text() and "A (n=140)" in cells
    data = collect(root)
    assert data.methods == ["nft", "ceag"] and data.budgets == [10000, 5000, 2000]
    with pytest.raises(RelucompError, match="no run at budget"):
        render_report(root, budget="3k")


def test_report_inline_and_single_compile_dir(tmp_path):
    # a `relucomp compile` output directory (one budget) without a fairness section
    d = tmp_path / "one"
    d.mkdir()
    rep = fake_report(4000, None, fairness=False)
    (d / "report.json").write_text(json.dumps(rep))
    html = render_report(d, inline=True)
    page = parse(html)
    assert len(page.imgs) == 5 and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    import base64

    for s in page.imgs:
        check_png(base64.b64decode(s.split(",", 1)[1]))
    # ψ_g computed from the group accuracies when the report has no fairness section
    delta = rep["accuracy"]["before"]["test"] - rep["accuracy"]["after"]["test"]
    psi = {g: (rep["group_accuracy"]["before"][g] - rep["group_accuracy"]["after"][g]) - delta for g in GROUPS}
    cells = set(page.cells)
    for g in GROUPS:
        assert f"{psi[g]:+.2f}" in cells
    assert f"{max(psi.values()):.2f}" in cells and "4,000" in cells
    assert collect(d).runs[0].fairness_source.startswith("computed")


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from relucomp.cli import app

    root = make_fake_sweep(tmp_path / "sw", budgets=(8000, 3000), methods=("nft",))
    res = CliRunner().invoke(app, ["report", str(root), "--budget", "8k"])
    assert res.exit_code == 0, res.output
    assert (root / "report.html").exists() and (root / "figures" / "psi_bars.png").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "error" in res.output


# --------------------------------------------------------------------------- search snapshots

def test_snl_search_snapshots(make_gated):
    from relucomp.infra import PassManager
    from relucomp.models import tinycnn
    from relucomp.passes.snl_search import SNLSearchPass

    gm, _ = make_gated(tinycnn(), "pixel")
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(2)]
    got, saved = [], []
    sp = SNLSearchPass(budget=3000, train_loader=loader, epochs=5, check_every=1, alpha_lr=0.15, lam=5.0,
                       snapshots=[6000, 12000, 3000], on_snapshot=lambda b, sd: got.append((b, sd)),
                       checkpoint=saved.append)
    st = PassManager([sp]).run(gm).stats["passes"][0]["stats"]
    assert [b for b, _ in got] == [12000, 6000, 3000]  # each budget once, largest first
    for b, sd in got:
        assert not bool(sd["relu1.hard"] if "relu1.hard" in sd else next(v for k, v in sd.items() if k.endswith(".hard")))
        soft = sum(int((v > 1e-2).sum()) for k, v in sd.items() if k.endswith("alpha"))
        info = st["snapshots"][str(b)]
        assert info["soft_relus"] == soft and info["reached"] == (soft <= b)
    assert st["snapshots"]["12000"]["reached"] and st["snapshots"]["6000"]["reached"]
    assert saved[-1]["snapshots"]  # resume-safe: a resumed search does not re-emit them
    with pytest.raises(ValueError):
        SNLSearchPass(budget=10, train_loader=loader, snapshots=[20])


# --------------------------------------------------------------------------- a real tiny sweep, interrupted + resumed

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_sweep_interrupted_and_resumed(tmp_path, rc_cache, monkeypatch):
    import relucomp.api as api
    from relucomp.sweep import sweep
    from relucomp.train import Interrupted

    real = api.compile
    calls = []

    def interrupting(*a, **kw):
        calls.append(kw)
        if kw.get("search_state") is not None and sum(c.get("search_state") is not None for c in calls) == 2:
            raise Interrupted("simulated Ctrl-C during the second budget", "run it again")
        return real(*a, **kw)

    monkeypatch.setattr(api, "compile", interrupting)
    out = tmp_path / "sweep"
    kw = dict(budgets="2k,6k", out_dir=out, limit=300, pretrain_epochs=1, search_epochs=1, finetune_epochs=1,
              export=False, progress=False)
    with pytest.raises(Interrupted, match="sweep interrupted at budget 2,000"):
        sweep("tinycnn", "synthetic", **kw)
    state = json.loads((out / "sweep.json").read_text())
    assert state["runs"]["6000"]["status"] == "done" and state["runs"]["2000"]["status"] == "running"
    assert len(calls) == 3 and calls[0]["search_snapshots"] == [6000, 2000] and calls[0]["finetune_epochs"] == 0
    assert {p.name for p in (out / "search" / "snapshots").glob("*.pt")} == {"6000.pt", "2000.pt"}

    with pytest.raises(RelucompError, match="other options"):
        sweep("tinycnn", "synthetic", **{**kw, "finetune_epochs": 2})

    calls.clear()
    res = sweep("tinycnn", "synthetic", **kw)
    assert res.skipped == ["6000"]
    assert len(calls) == 1 and calls[0]["relu_budget"] == 2000 and calls[0]["search_state"] is not None
    assert not (out / "search" / "snapshots").exists()  # cleaned up once complete
    reps = {r["budget"]: json.loads((out / r["dir"] / "report.json").read_text()) for r in res.runs}
    assert reps[6000]["relus"]["after"] <= 6000 and reps[2000]["relus"]["after"] <= 2000
    assert reps[2000]["search"]["warm_start"] is True and reps[2000]["sweep"]["budget"] == 2000
    state = json.loads((out / "sweep.json").read_text())
    assert state["complete"] and set(state["searches"]["shared"]["snapshots"]) == {"6000", "2000"}

    # nothing left to do: no compile at all
    calls.clear()
    assert sweep("tinycnn", "synthetic", **kw).skipped == ["6000", "2000"] and calls == []

    html = render_report(out)
    page = check_html_figures(html)
    cells = set(page.cells)
    for b, rep in reps.items():
        assert f"{rep['accuracy']['after']['test']:.2f}" in cells
        for v in rep["group_accuracy"]["after"].values():
            assert f"{v:.2f}" in cells


# --------------------------------------------------------------------------- sweep logic with a fake compile

def _fake_compile_factory(calls):
    import relucomp.api as api

    def fake(model, data, *, relu_budget, out_dir=None, search_snapshots=(), on_snapshot=None, search_state=None,
             fair_method=None, **kw):
        calls.append({"budget": relu_budget, "fair_method": fair_method, "warm": search_state is not None})
        for b in search_snapshots:
            on_snapshot(b, {"w": torch.zeros(1)})
        rep = fake_report(relu_budget, fair_method)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "report.json").write_text(json.dumps(rep))
        return api.CompileResult(model=None, report=rep, out_dir=Path(out_dir) if out_dir else None)

    return fake


def test_sweep_methods_and_fallback(tmp_path, monkeypatch):
    import relucomp.api as api
    import relucomp.sweep as sw

    calls: list = []
    monkeypatch.setattr(api, "compile", _fake_compile_factory(calls))
    monkeypatch.setattr(sw, "_model_relus", lambda model, size: TOTAL)
    res = sw.sweep("tinycnn", "synthetic", budgets="50%,4000", fair_methods=["nft", "ceag"], out_dir=tmp_path / "a")
    assert [r["name"] for r in res.runs] == ["10240-nft", "10240-ceag", "4000-nft", "4000-ceag"]
    assert calls[0] == {"budget": 4000, "fair_method": "nft", "warm": False}  # one shared, unconstrained search
    assert [c["fair_method"] for c in calls[1:]] == ["nft", "ceag", "nft", "ceag"] and all(c["warm"] for c in calls[1:])

    # fair_phase=search: one search per method
    calls.clear()
    sw.sweep("tinycnn", "synthetic", budgets="4000,8000", fair_methods=["nft", "ceag"], fair_phase="search",
             out_dir=tmp_path / "b")
    assert [(c["fair_method"], c["warm"]) for c in calls if not c["warm"]] == [("nft", False), ("ceag", False)]


# --------------------------------------------------------------------------- a real browser

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(fake_sweep_html, tmp_path):
    html = fake_sweep_html
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={shot}", "--window-size=1280,2000", html.resolve().as_uri()],
                       check=False, capture_output=True, timeout=50)
    assert shot.exists(), "chromium wrote no screenshot"
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert img.shape[:2] == (2000, 1280)
    # the figures loaded: a broken <img> would leave the page almost all white/grey text
    colourful = (img.max(2) - img.min(2) > 80).mean()
    assert colourful > 0.01, f"only {colourful:.4f} of the page is coloured: figures missing?"


def test_pi_latency_sources(monkeypatch, tmp_path):
    import sys
    import types

    rep = fake_report(3000, None)
    assert pi_latency(100, {"pi": {"measured": {"latency_s": 0.7}}}) == (0.7, "measured (2PC)")
    (tmp_path / "pi_bench.json").write_text(json.dumps({"latency_s": 0.9}))
    assert pi_latency(100, rep, run_dir=tmp_path) == (0.9, "measured (2PC)")
    # the relucomp.pi cost model (here: a stand-in), from the report's counts
    mod = types.ModuleType("relucomp.pi.estimate")
    mod.load_cost_model = lambda: {"source": "test"}
    mod.onnx_costs = lambda path: {}
    mod.predict = lambda costs, model: {"latency_s": 0.5 + 1e-5 * costs["relus"] + 1e-6 * costs["gather_elements"]}
    monkeypatch.setitem(sys.modules, "relucomp.pi.estimate", mod)
    gathered = sum(2 * p["relus_before"] for p in rep["per_layer"] if 0 < p["relus_after"] < p["relus_before"])
    s, label = pi_latency(3000, rep)
    assert s == pytest.approx(0.5 + 0.03 + 1e-6 * gathered) and label == "estimated (relucomp.pi cost model)"
    # no cost model at all: 0.29 s + 16 µs per ReLU
    monkeypatch.setitem(sys.modules, "relucomp.pi.estimate", None)
    assert pi_latency(12_288) == pytest.approx((0.29 + 16e-6 * 12_288, FALLBACK_LABEL))


# --------------------------------------------------------------------------- differential privacy

def fake_dp_report(eps: float | None, seed: int) -> dict:
    """A compile report at 4,000 ReLUs; ``eps`` None: non-private; inf: DP-SGD without noise."""
    rep = fake_report(4000, "nft", seed=seed)
    y, pd_, pc, g = _predictions(3000, "nft", seed + 1)  # the averaged weights: other predictions
    rep["fairness"]["results"]["ema"] = {"test": fairness_report(y, pd_, pc, g, GROUPS, n_boot=0, seed=seed)}
    if eps is not None:
        private = eps != float("inf")
        rep["dp"] = {"private": private, "epsilon_target": eps if private else None,
                     "epsilon_spent": 0.998 * eps if private else None, "delta": 1e-5,
                     "noise_multiplier": 0.5 + 1.0 / eps, "max_grad_norm": 1.0, "sample_rate": 0.0457, "steps": 44,
                     "conversion": ["folded 2 BatchNorm layer(s) into the preceding conv/linear (exact)"],
                     "export_weights": "ema"}
    return rep


def test_report_dp_runs_accuracy_and_psi_vs_epsilon(tmp_path):
    """Several compile directories side by side (non-private, ε = 1, 8, ∞): the DP figure and table."""
    root = tmp_path / "dp"
    reps = {}
    for i, (name, eps) in enumerate([("non-private", None), ("eps1", 1.0), ("eps8", 8.0), ("epsinf", float("inf"))]):
        d = root / name
        d.mkdir(parents=True)
        reps[name] = fake_dp_report(eps, seed=11 + i)
        (d / "report.json").write_text(json.dumps(reps[name]))
    data = collect(root)
    assert sorted(r.name for r in data.runs) == sorted(reps) and sum(r.dp is not None for r in data.runs) == 3
    assert len(set(r.method for r in data.runs)) == 4  # runs differing only in ε stay apart
    html = render_report(root)
    page = parse(html)
    figs = sorted(p.name for p in (root / "figures").glob("*.png"))
    assert "dp_epsilon.png" in figs and len(figs) == 6 and sorted(Path(s).name for s in page.imgs) == figs
    check_png(root / "figures" / "dp_epsilon.png")
    cells = page.cells
    text = html.read_text(encoding="utf-8")
    assert "accuracy and max ψ_g vs ε" in text
    for name in ("eps1", "eps8", "epsinf"):
        rep = reps[name]
        row = cells[cells.index(name) - 0: cells.index(name) + 15]
        res = rep["fairness"]["results"]
        assert f"{rep['dp']['epsilon_spent']:.3f}" in row if rep["dp"]["private"] else "∞ (no noise)" in row
        assert f"{rep['dp']['noise_multiplier']:.3f}" in row and "0.0457" in row and "44" in row
        assert f"{res['last']['test']['overall']['acc_compiled']:.2f}" in row
        assert f"{res['ema']['test']['overall']['acc_compiled']:.2f}" in row
        assert f"{res['ema']['test']['max_psi']:+.2f}" in row and "ema" in row
    assert "non-private" in cells
    # a single DP compile directory renders its DP section too
    one = tmp_path / "one"
    one.mkdir()
    (one / "report.json").write_text(json.dumps(reps["eps8"]))
    page1 = parse(render_report(one))
    assert "dp_epsilon.png" in {Path(s).name for s in page1.imgs} and "7.984" in page1.cells
