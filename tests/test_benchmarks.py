"""The benchmark commands the README names reproduce the files they name (no training: the schedule keys only)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_robust():
    return _load("bench_robust")


@pytest.fixture(scope="module")
def bench_dp():
    return _load("bench_dp")


def test_the_defaults_are_robust_json_s_schedule(bench_robust):
    """`python benchmarks/bench_robust.py --seed N` writes rows under robust.json's key (no option needed), and the
    file holds the four seeds the README's table averages."""
    doc = json.loads((RESULTS / "robust.json").read_text())
    a = bench_robust.parse([])
    assert bench_robust.schedule_key(a) == doc["schedule_key"]
    assert (a.pretrain_epochs, a.epochs, a.finetune_epochs, a.teacher_epochs, a.samples) == (20, 3, 4, 20, 500)
    assert Path(a.out) == RESULTS / "robust.json"
    assert doc["seeds"] == [0, 1, 2, 3] and doc["complete"]


def test_quick_is_a_smoke_run_that_never_lands_in_the_record(bench_robust):
    a = bench_robust.parse(["--quick"])
    assert Path(a.out).name == "robust_quick.json"
    assert bench_robust.schedule_key(a) != bench_robust.schedule_key(bench_robust.parse([]))
    assert (a.pretrain_epochs, a.teacher_epochs) == (4, 2)
    # an explicit option wins over the preset
    assert bench_robust.parse(["--quick", "--teacher-epochs", "5"]).teacher_epochs == 5


def test_command_for_every_result_file_round_trips(bench_robust):
    """--command FILE: today's options for a file written under earlier defaults give the same schedule."""
    files = [f for f in sorted(RESULTS.glob("robust*.json")) if "schedule_key" in json.loads(f.read_text())]
    assert len(files) >= 30
    for f in files:
        key = json.loads(f.read_text())["schedule_key"]
        argv = bench_robust.command_for(key)
        got = bench_robust.schedule_key(bench_robust.parse(argv))
        assert bench_robust.normalized(got) == bench_robust.normalized(key), (f.name, argv)
    # keys written before an option existed mean its old default
    old = json.loads((RESULTS / "robust_6000.json").read_text())["schedule_key"]
    assert "jsd_weight" not in old and "clean_teacher" not in old
    argv = bench_robust.command_for(old)
    assert argv[argv.index("--jsd-weight") + 1] == "12" and argv[argv.index("--clean-teacher") + 1] == "robust"
    assert "--one-teacher" in argv and argv[argv.index("--trades-beta") + 1] == "6"


def test_model_option_enters_the_key_only_when_not_resnet8(bench_robust):
    """--model keeps resnet8's files valid (no key field) and a wider model's rows apart (their own key)."""
    plain = bench_robust.schedule_key(bench_robust.parse([]))
    assert "model" not in plain
    wide = bench_robust.schedule_key(bench_robust.parse(["--model", "benchmarks/wide_models.py:resnet8_w2"]))
    assert wide == plain | {"model": "benchmarks/wide_models.py:resnet8_w2"}
    assert bench_robust.command_for(wide) == ["--model", "benchmarks/wide_models.py:resnet8_w2"]
    wide_models = _load("wide_models")
    m = wide_models.resnet8_w2(num_classes=10)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert (m.conv1.out_channels, m.fc.in_features) == (32, 128)   # resnet8's 16 / 64, doubled


def test_every_readme_command_reproduces_its_file(bench_robust):
    readme = (ROOT / "README.md").read_text()
    pairs = re.findall(r"`bench_robust\.py((?: [^`]*)?)` → `(robust[^`]*\.json)`", readme)
    assert len(pairs) >= 30
    named = set(re.findall(r"`(robust[a-z0-9_]*\.json)`", readme)) - {"robust_quick.json"}  # --quick's, not a result
    keyed = {f for f in named if "schedule_key" in json.loads((RESULTS / f).read_text())}
    assert keyed <= {f for _, f in pairs}, keyed - {f for _, f in pairs}
    for args, f in pairs:
        key = json.loads((RESULTS / f).read_text())["schedule_key"]
        got = bench_robust.schedule_key(bench_robust.parse(shlex.split(args)))
        assert bench_robust.normalized(got) == bench_robust.normalized(key), (f, args)


def _dp_schedule(bench_dp, argv: list[str], recorded: dict) -> dict:
    return bench_dp.schedule(bench_dp.parser().parse_args(argv), recorded["data"], recorded["budget"])


def test_bench_dp_defaults_are_dp_json_s_schedule(bench_dp):
    rec = json.loads((RESULTS / "dp.json").read_text())
    assert _dp_schedule(bench_dp, [], rec["schedule"]) == rec["schedule"]
    assert bench_dp.parser().parse_args([]).ceag and "non-private+ceag" in rec["results"]
    assert "eps=8+C30" in rec["results"]          # the rows' names follow C (row_suffix)
    assert bench_dp.row_suffix(bench_dp.parser().parse_args([])) == "+C30"


def test_every_readme_bench_dp_command_reproduces_its_file(bench_dp):
    """Runs are kept per seed (a second process may add seeds), so the seeds are the one field not compared."""
    pairs = re.findall(r"`bench_dp\.py((?: [^`]*)?)` → `(dp[A-Za-z0-9_]*\.json)`", (ROOT / "README.md").read_text())
    assert {f for _, f in pairs} >= {"dp.json", "dp_C1.json", "dp_clipauto.json", "dp_perseed_dense.json"}
    for args, f in pairs:
        rec = json.loads((RESULTS / f).read_text())["schedule"]
        got = _dp_schedule(bench_dp, shlex.split(args), rec)
        assert {k: v for k, v in got.items() if k != "seeds"} == {k: v for k, v in rec.items() if k != "seeds"}, f


class _FakeReport:
    """What bench_robust reads from a compile's report, with CA = 40 + 10·robust + calls (so reruns show)."""

    def __init__(self, robust: bool, n: int):
        def m(ca: float) -> dict:
            return {"ca": ca, "npa": ca / 2, "adva": 10.0 * robust, "npa_by_corruption": {"fog": ca / 2},
                    "npa_by_severity": {"1": ca / 2}}

        ca = 40.0 + 10 * robust + n
        self.relus_after, self.relus_before, self.test_accuracy = 100, 1000, (50.0, ca)
        self.robustness = {"models": {"dense": m(50.0), "compiled": m(ca)}, "settings": {"pgd_steps": 10},
                           "samples": 8, "robust_compile": {"teacher": {"ca": 45.0}, "teacher_history": []}}
        self.phases_seconds = {"finetune": 1.0}
        self.data = {"summary": {"splits": {"train": {"n": 6}, "val": {"n": 2}, "test": {"n": 8}}}}


def test_bench_robust_resumes_from_its_json(bench_robust, tmp_path, monkeypatch):
    """The JSON is the checkpoint: a rerun keeps the seed's finished (budget, mode) compiles; --no-resume redoes
    them."""
    calls: list[bool] = []

    def fake_compile(model, data, **kw):
        calls.append(bool(kw.get("robust")))
        return type("R", (), {"report": _FakeReport(bool(kw.get("robust")), len(calls))})()

    monkeypatch.setattr(bench_robust, "rc_compile", fake_compile)
    out = tmp_path / "r.json"
    argv = ["--quick", "--data", str(tmp_path), "--budgets", "10%,30%", "--out", str(out),
            "--threads", str(torch.get_num_threads())]     # main() sets it process-wide
    bench_robust.main(argv)
    assert calls == [False, True, False, True]
    doc = json.loads(out.read_text())
    assert doc["complete"] and [r["robust_minus_plain"]["ca"] for r in doc["runs"]] == [11.0, 11.0]
    assert doc["runs"][0]["argv"] == argv

    # a run stopped after 30 %'s plain compile: the rerun does only 30 %'s robust compile
    doc["runs"][1].pop("robust")
    doc["runs"][1].pop("robust_minus_plain")
    doc["complete"] = False
    out.write_text(json.dumps(doc))
    calls.clear()
    bench_robust.main(argv)
    assert calls == [True]
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["runs"][0]["plain"]["compiled"]["ca"] == 41.0
    assert doc["runs"][1]["robust"]["compiled"]["ca"] == 51.0 and doc["settings"]["pgd_steps"] == 10

    calls.clear()
    bench_robust.main(argv)                      # everything finished: no compile at all
    assert calls == []
    bench_robust.main([*argv, "--no-resume"])    # recompute
    assert calls == [False, True, False, True]
    # another schedule never takes this file's rows
    calls.clear()
    bench_robust.main([*argv, "--teacher-epochs", "3"])
    assert calls == [False, True, False, True]


def test_ca_gap_splits_robust_minus_plain_into_its_three_parts(bench_robust):
    def run(budget, dense, teacher, plain, student):
        return {"budget": budget, "plain": {"dense": {"ca": dense}, "compiled": {"ca": plain}},
                "robust": {"dense": {"ca": teacher, "adva": 9.0}, "compiled": {"ca": student}}}

    doc = {"runs": [run("30%", 50.0, 45.0, 49.0, 47.0), run("30%", 52.0, 47.0, 51.0, 49.0)]}
    row = bench_robust.ca_gap(doc).splitlines()[-1]
    assert row == "| 30% (2) | 51.0 | 46.0 (9.0) | -5.0 | -1.0 | +2.0 | **-2.0** |"
    # on the record, the last column is the summary's robust − plain CA
    rec = json.loads((RESULTS / "robust.json").read_text())
    lines = bench_robust.ca_gap(rec).splitlines()[2:]
    for line, (budget, s) in zip(lines, rec["summary"].items()):
        assert line.startswith(f"| {budget} (4) |")
        assert line.endswith(f"**{s['robust_minus_plain']['ca']['mean']:+.1f}** |")


def test_robust_frontier_fits_the_line_and_judges_the_goal(tmp_path):
    fr = _load("robust_frontier")

    def pt(adva, ca, npa=4.0, family="current", budget="30%"):
        return {"adva": adva, "ca": ca, "npa": npa, "family": family, "budget": budget, "file": f"{adva}.json",
                "label": str(adva)}

    # on the exact line CA = 5 − 0.8·AdvA: slope −0.8, CA −3 at the goal's AdvA +10, no residual
    pts = [pt(8.0, -1.4), pt(9.0, -2.2), pt(11.0, -3.8), pt(12.0, 2.0, family="older")]
    s = fr.analyse(pts)["30%"]
    assert s["line"]["slope_ca_per_adva"] == -0.8 and s["line"]["ca_at_goal_adva"] == -3.0
    assert s["line"]["residual_std"] == 0.0 and s["fitted_over"] == ["8.0.json", "9.0.json", "11.0.json"]
    assert s["meet_goal"] == ["12.0.json (12.0)"]            # the only point with AdvA ≥ 10, CA ≥ −2, NPA ≥ 3
    assert not fr.meets(pt(12.0, 2.0, npa=2.9)) and not fr.meets(pt(9.9, 0.0)) and fr.meets(pt(10.0, -2.0, npa=3.0))
    # the committed JSON is what the committed inputs give (no stale figures in the README)
    out = tmp_path / "f.json"
    assert fr.main(["--out", str(out), "--no-figure"]) == 0
    fresh, rec = json.loads(out.read_text()), json.loads((RESULTS / "robust_frontier.json").read_text())
    assert fresh == rec
    assert rec["budgets"]["30%"]["meet_goal"] == [] and rec["budgets"]["30%"]["line"]["ca_at_goal_adva"] < -2


def test_bench_core_update_timings_keeps_what_it_does_not_remeasure(tmp_path, monkeypatch):
    """--update-timings re-measures pass times and step costs only: the accuracy rows, with the machine they ran
    on, and any other section of the file stay as they were."""
    bc = _load("bench_core")
    monkeypatch.setattr(bc, "pass_times", lambda: {"seconds": {"trace": 0.1}})
    monkeypatch.setattr(bc, "step_cost", lambda arch="resnet8", batch=64: {"model": arch, "ratio": 1.2})
    out = tmp_path / "core.json"
    rows = [{"budget": 2000, "acc_test": 64.3}]
    out.write_text(json.dumps({"benchmark": "core", "machine": {"cpu": "first"}, "pass_times": {"seconds": {}},
                               "accuracy_vs_budget": {"rows": rows}, "extra_section": {"kept": True}}))
    assert bc.main(["--update-timings", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["accuracy_vs_budget"] == {"rows": rows, "machine": {"cpu": "first"}}
    assert d["extra_section"] == {"kept": True} and d["pass_times"] == {"seconds": {"trace": 0.1}}
    assert d["gated_step_cost_resnet18"] == {"model": "resnet18", "ratio": 1.2}
    assert d["machine"]["cpu"] != "first" and "load_average_at_end" in d["machine"]
