"""CompileConfig: TOML files, flag overrides, up-front validation, replay, resume and clean failure."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from relucomp.config import KEYWORDS, CompileConfig, load_config, resolve_config, to_toml, validate
from relucomp.errors import ConfigError, RelucompError

from _cli import invoke, one_line_error

QUICK = ["--limit", "300", "--pretrain-epochs", "0", "--epochs", "1", "--finetune-epochs", "1", "--no-progress"]


# --------------------------------------------------------------------------- the config type

def test_every_keyword_maps_to_a_config_field_and_sections_exist():
    cfg = CompileConfig()
    for kw, dotted in KEYWORDS.items():
        cfg.get(dotted)  # raises if the field does not exist
    assert cfg.dp.epsilon is None and cfg.dp.delta is None and cfg.dp.max_grad_norm is None
    assert cfg.robustness.eval is False and cfg.robustness.robust is False
    assert cfg.search.kd_temperature == 4.0


def test_toml_round_trip_and_overrides(tmp_path):
    cfg = resolve_config(None, {"relu_budget": "15k", "granularity": "channel", "fair_groups": "race,gender",
                                "search_epochs": 7, "tolerance": 1.5, "checkpoint": tmp_path / "w.pt",
                                "data.spec": 'folder:/x/with "quotes"'})
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg))
    back = load_config(path)
    assert back == cfg
    assert back.search.epochs == 7 and back.data.fair_groups == "race,gender" and back.model.checkpoint == str(tmp_path / "w.pt")
    assert resolve_config(path, {"search_epochs": 2}).search.epochs == 2  # a flag wins over the file


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[search]\ngranulrity = 'pixel'\n")
    with pytest.raises(ConfigError, match="unknown config option 'search.granulrity'"):
        load_config(bad)
    bad.write_text("[search]\nepochs = 'many'\n")
    with pytest.raises(ConfigError, match="search.epochs"):
        load_config(bad)
    bad.write_text("[search\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown option 'granularty'"):
        resolve_config(None, {"granularty": "pixel"})


@pytest.mark.parametrize("args, fragments", [
    (["--granularity", "atom"], ["unknown granularity 'atom'", "pixel | channel | layer"]),
    (["--search", "random"], ["unknown search method 'random'"]),
    (["--fair-method", "fancy"], ["unknown fairness method 'fancy'"]),
    (["--fair-phase", "never"], ["unknown fairness phase 'never'"]),
    (["-b", "lots"], ["cannot parse ReLU budget 'lots'"]),
    (["--device", "tpu"], ["unknown device 'tpu'", "--device cpu"]),
    (["--device", "cuda"], ["--device cuda", "--device cpu"]),
    (["--limit", "5"], ["--limit 5 is too small", "--limit 100 or more"]),
    (["--limit", "50"], ["--limit 50 is too small"]),
    (["--epochs", "0"], ["--epochs 0 with --search snl", "--epochs 1 or more"]),
    (["--seed", "-3"], ["--seed -3 must be ≥ 0", "--seed 0 or more"]),     # was an internal error (numpy)
    (["--data", "utkface:/no/such/dir"], ["data path /no/such/dir does not exist"]),
    (["--data", "imagenet:/x"], ["unknown data spec kind 'imagenet'"]),
])
def test_invalid_options_fail_fast_with_one_line(args, fragments, tmp_path, monkeypatch):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import relucomp.data.load as load

    monkeypatch.setattr(load, "load_data", lambda *a, **k: pytest.fail("data loaded before validation"))
    out = tmp_path / "never"
    r = invoke(["compile", "tinycnn", "-b", "2k", "--out", out, *args])
    one_line_error(r, *fragments)
    assert not out.exists()  # nothing created by a refused run


def test_invalid_granularity_with_real_data_path_fails_in_under_2s(tmp_path, monkeypatch):
    """The issue's example: --granularity atom with a real utkface directory fails before any data is read."""
    import relucomp.data.load as load

    utk = tmp_path / "UTKFace"
    utk.mkdir()
    for i in range(3):
        (utk / f"{20 + i}_0_{i}_2017010{i}.jpg.chip.jpg").write_bytes(b"\xff\xd8 not decoded")
    monkeypatch.setattr(load, "load_data", lambda *a, **k: pytest.fail("data loaded before validation"))
    invoke(["version"])  # imports done: time the check, not Python's start-up
    t0 = time.perf_counter()
    r = invoke(["compile", "--granularity", "atom", "--data", f"utkface:{utk}", "-b", "2k", "--out", tmp_path / "o"])
    seconds = time.perf_counter() - t0
    one_line_error(r, "unknown granularity 'atom'")
    assert seconds < 2.0, seconds
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1


def test_print_config_shows_resolved_toml(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[search]\nrelu_budget = "3k"\ngranularity = "channel"\nepochs = 9\n[runtime]\nseed = 4\n')
    r = invoke(["compile", "--config", f, "--epochs", "2", "--print-config"])
    assert r.exit_code == 0, r.output
    printed = load_config_text(r.stdout, tmp_path)
    assert printed.search.relu_budget == "3k" and printed.search.granularity == "channel"
    assert printed.search.epochs == 2 and printed.runtime.seed == 4  # the flag overrides the file
    # the effort preset is resolved in what is printed (and in OUT/config.toml): replay is exact
    assert printed.runtime.effort == "quick" and printed.finetune.epochs == 3 and printed.runtime.batch_size == 64
    assert printed.search.replacement == "affine" and printed.finetune.temperature == 4.0
    r = invoke(["compile", "--config", f, "--effort", "standard", "--replacement", "identity", "--print-config"])
    printed = load_config_text(r.stdout, tmp_path)
    assert (printed.runtime.effort, printed.search.epochs, printed.finetune.epochs) == ("standard", 9, 10)
    assert printed.search.replacement == "identity"
    one_line_error(invoke(["compile", "-b", "2k", "--effort", "max"]), "unknown effort 'max'", "--effort quick")


def test_any_config_option_overrides_from_the_command_line(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[search]\nalpha_lr = 0.5\n[robustness]\nsamples = 64\n')
    # spaCy-style --section.field VALUE / =VALUE, dashes or underscores, before MODEL or after it; values read as TOML
    r = invoke(["compile", "--search.alpha-lr", "0.1", "tinycnn", "--config", f, "--robustness.pgd_epsilon=8/255",
                "--robustness.eval", "--data.limit", "300", "--fairness.method", "null", "--print-config"])
    assert r.exit_code == 0, r.output
    printed = load_config_text(r.stdout, tmp_path)
    assert printed.model.spec == "tinycnn" and printed.search.alpha_lr == 0.1  # the override beats the file
    assert printed.robustness.samples == 64 and printed.robustness.pgd_epsilon == "8/255"
    assert printed.robustness.eval is True and printed.data.limit == 300 and printed.fairness.method is None
    r = invoke(["compile", "--runtime.pin_memory", "--finetune.ema", "false", "--print-config"])  # bare = true
    printed = load_config_text(r.stdout, tmp_path)
    assert printed.runtime.pin_memory is True and printed.finetune.ema is False
    r = invoke(["compile", "--search.epochs", "4", "--print-config"])  # no MODEL: the override is not taken for it
    printed = load_config_text(r.stdout, tmp_path)
    assert printed.model.spec is None and printed.search.epochs == 4
    # sweep takes them too: this one reaches validation (a teacher rate without --robust), before any work
    one_line_error(invoke(["sweep", "--budgets", "1k", "--out", tmp_path / "s", "--robustness.teacher_lr", "0.01"]),
                   "teacher_lr")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args,fragments", [
    (["compile", "--robustnes.teacher_lr", "1"], ["unknown config option 'robustnes.teacher_lr'",
                                                 "did you mean 'robustness.teacher_lr'?"]),
    (["compile", "--relu-budgt", "5k"], ["no such option: --relu-budgt", "did you mean --relu-budget?"]),
    (["compile", "--teacher-lr", "0.1"], ["no such option: --teacher-lr", "did you mean --robustness.teacher_lr?"]),
    # a field that has a flag is named by the flag; flags that end in the word are offered beside it
    (["compile", "--epsilon", "8"], ["no such option: --epsilon", "did you mean --dp-epsilon or --pgd-epsilon?"]),
    (["compile", "--steps", "3"], ["no such option: --steps", "did you mean --pgd-steps or --train-attack-steps?"]),
    (["compile", "tinycnn", "extra"], ["unexpected argument 'extra'"]),
    (["compile", "--epochs", "3", "--search.epochs", "2"], ["search.epochs given twice (as --epochs and as "
                                                            "--search.epochs)"]),
    (["compile", "--search.epochs", "2", "--search.epochs=3"], ["search.epochs given twice"]),
    (["compile", "--search.epochs", "two"], ["search.epochs = 'two'"]),
    (["compile", "--search.epochs"], ["--search.epochs needs a value", "--search.epochs=VALUE"]),
    (["sweep", "--budgets", "1k", "--search.relu_budget", "5k"], ["--search.relu_budget does not apply to a sweep",
                                                                  "give --budgets instead"]),
])
def test_bad_command_line_overrides_fail_in_one_line(args, fragments):
    one_line_error(invoke(args + ["--print-config"] if args[0] == "compile" else args), *fragments)


def load_config_text(text: str, tmp_path: Path) -> CompileConfig:
    p = tmp_path / "printed.toml"
    p.write_text(text)
    return load_config(p)


def test_robust_compile_validates_and_dp_is_validated():
    cfg = validate(resolve_config(None, {"relu_budget": 100, "dp.epsilon": 8.0, "fair_groups": "group"}))
    assert cfg.fair_method == "nft" and cfg.export_weights == "ema"  # DP: fairness measured, EMA exported
    ceag = validate(resolve_config(None, {"relu_budget": 100, "dp.epsilon": 8.0, "fair_groups": "group",
                                          "fair_method": "ceag"}))  # opt-in: duals on the validation split
    assert ceag.fair_method == "ceag" and ceag.fairness.heldout_dual_lr == 0.2
    with pytest.raises(ConfigError, match="heldout_dual_lr"):
        validate(resolve_config(None, {"relu_budget": 100, "fairness.heldout_dual_lr": 0.0}))
    with pytest.raises(ConfigError, match="differential privacy is off"):
        validate(resolve_config(None, {"relu_budget": 100, "dp.delta": 1e-6}))
    assert validate(resolve_config(None, {"relu_budget": 100, "robustness.robust": True})).robustness.robust
    with pytest.raises(ConfigError, match="--robust with --dp-epsilon"):
        validate(resolve_config(None, {"relu_budget": 100, "robustness.robust": True, "dp.epsilon": 8.0}))
    validate(resolve_config(None, {"relu_budget": 100, "robustness.eval": True}))  # the evaluation exists


# --------------------------------------------------------------------------- replay, resume, cleanup

@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RELUCOMP_CACHE", str(root / "cache"))
        r = invoke(["compile", "tinycnn", "-b", "3k", "--out", root / "out", "--seed", "3", *QUICK])
    assert r.exit_code == 0, r.output
    return root


def _kept(rep):
    return [(r["site"], r["relus_after"]) for r in rep["per_layer"]]


def test_replay_from_config_toml_reproduces_the_run(first_run, monkeypatch):
    from relucomp.onnx_graph import walk

    root = first_run
    monkeypatch.setenv("RELUCOMP_CACHE", str(root / "cache"))
    out, out2 = root / "out", root / "out2"
    cfg_text = (out / "config.toml").read_text()
    assert 'relu_budget = "3k"' in cfg_text and "seed = 3" in cfg_text and "limit = 300" in cfg_text
    assert 'effort = "quick"' in cfg_text and "batch_size = 64" in cfg_text and 'replacement = "affine"' in cfg_text
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["search"]["relu_budget"] == "3k" and rep["schema_version"] == 2
    r = invoke(["compile", "--config", out / "config.toml", "--out", out2, "--no-progress"])
    assert r.exit_code == 0, r.output
    rep2 = json.loads((out2 / "report.json").read_text())
    assert walk(out / "model.onnx")["relus"] == walk(out2 / "model.onnx")["relus"] == rep["relus"]["after"]
    assert _kept(rep) == _kept(rep2)
    assert rep["accuracy"]["after"]["test"] == rep2["accuracy"]["after"]["test"]
    assert rep2["config"]["runtime"]["out_dir"] == str(out2)
    for name in ("model.onnx", "report.json", "config.toml", "model.pt", "splits.json"):
        assert stat.S_IMODE((out2 / name).stat().st_mode) & 0o044 == 0o044, name  # readable by group/others
    assert not (out2 / "checkpoint.pt").exists() and not (out2 / "pretrained.pt").exists()


def test_resume_on_a_finished_directory_says_so(first_run, monkeypatch):
    import relucomp.stages.data as data_stage

    monkeypatch.setattr(data_stage, "run", lambda st: pytest.fail("redid the work"))
    before = (first_run / "out" / "report.json").read_text()
    r = invoke(["compile", "tinycnn", "-b", "3k", "--out", first_run / "out", "--seed", "3", "--resume", *QUICK])
    assert r.exit_code == 0, r.output
    assert "holds a finished run" in " ".join(r.output.split()) and "nothing to resume" in " ".join(r.output.split())
    assert (first_run / "out" / "report.json").read_text() == before


def test_inspect_an_output_directory(first_run):
    r = invoke(["inspect", first_run / "out", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    rep = json.loads((first_run / "out" / "report.json").read_text())
    assert info["total"]["relus"] == rep["relus"]["after"] and info["total"]["comparisons"] >= info["total"]["relus"]


def test_inspect_weights_file_gives_the_right_advice(first_run):
    r = invoke(["inspect", first_run / "out" / "model.pt"])
    one_line_error(r, "is a weights file", "--checkpoint")
    assert ":make_model" not in r.output


def test_failed_run_leaves_nothing_behind(tmp_path, rc_cache):
    out = tmp_path / "fresh"
    r = invoke(["compile", "tinycnn", "-b", "30k", "--out", out, *QUICK])  # refused after tracing (needs the model)
    one_line_error(r, "above the model's 20,480 ReLUs")
    assert not out.exists()


def test_internal_errors_exit_3_and_say_it_is_a_bug(tmp_path, monkeypatch):
    import relucomp.api as api
    from relucomp.errors import PassError

    def broken(**kw):
        raise PassError("FoldBatchNormPass", "output changed by 3.2")

    monkeypatch.setattr(api, "compile", broken)
    r = invoke(["compile", "tinycnn", "-b", "2k", "--out", tmp_path / "o", *QUICK])
    assert r.exit_code == 3, r.output
    assert "relucomp bug" in " ".join(r.output.split()) and "internal error" in " ".join(r.output.split()) and "Traceback" not in r.output

    def crashing(**kw):
        raise RuntimeError("an unexpected failure deep inside")

    monkeypatch.setattr(api, "compile", crashing)
    r = invoke(["compile", "tinycnn", "-b", "2k", "--out", tmp_path / "o", *QUICK])
    assert r.exit_code == 3 and "RuntimeError: an unexpected failure" in " ".join(r.output.split()), r.output


USER_MODEL = '''
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


def make(num_classes=10):
    return nn.Sequential(Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
'''


def test_user_file_model_without_checkpoint_is_pretrained(tmp_path, rc_cache, monkeypatch):
    import relucomp.api as api
    import relucomp.stages.pretrain as pretrain_stage

    f = tmp_path / "user.py"
    f.write_text(USER_MODEL)
    seen = []

    class Stop(Exception):
        pass

    def record(model, bundle, *, epochs, **kw):
        seen.append(epochs)
        raise Stop

    monkeypatch.setattr(pretrain_stage, "pretrain", record)
    with pytest.raises(Stop):
        api.compile(f"{f}:make", "synthetic", relu_budget=100, limit=300, progress=False)
    assert seen == [15]  # the default effort (quick) pretrains an untrained model for 15 epochs
    # --pretrained: the user vouches for the factory's weights
    res = api.compile(f"{f}:make", "synthetic", relu_budget=100, limit=300, search_epochs=1, finetune_epochs=0,
                      pretrained=True, progress=False)
    assert seen == [15] and res.report["pretrain"] == {} and res.report["options"]["pretrain_epochs"] == 0


def test_leaf_module_flag_exists_and_resolves(tmp_path, rc_cache):
    assert "--leaf-module" in invoke(["compile", "--help"]).output
    f = tmp_path / "user.py"
    f.write_text(USER_MODEL)
    r = invoke(["compile", f"{f}:make", "-b", "100", "--leaf-module", "Nope", "--out", tmp_path / "o", *QUICK])
    one_line_error(r, "no submodule of class 'Nope'")
    r = invoke(["compile", f"{f}:make", "-b", "100", "--leaf-module", "Block", "--out", tmp_path / "o", *QUICK])
    # the only ReLUs are inside the opaque Block: counted, not gateable, and over the budget -> refused up front
    one_line_error(r, "comparisons per image that relucomp cannot gate", "un-leaf the module")


def test_corrupt_checkpoint_message_does_not_quote_torch_advice(tmp_path, rc_cache):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip" * 4)
    r = invoke(["inspect", "tinycnn", "--checkpoint", bad])
    one_line_error(r, "corrupt")
    assert "weights_only=False" not in r.output and "re-run" not in r.output


class _InterruptOnEpoch:
    def __init__(self, loader, epoch):
        self.loader, self.epoch, self.calls = loader, epoch, 0

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        self.calls += 1
        if self.calls == self.epoch:
            raise KeyboardInterrupt
        return iter(self.loader)


def test_ctrl_c_in_pretraining_saves_and_resume_continues(tmp_path, monkeypatch):
    import torch

    import relucomp.api as api
    import relucomp.stages.pretrain as pretrain_stage
    from relucomp.errors import Interrupted

    monkeypatch.setenv("RELUCOMP_CACHE", "off")
    real = pretrain_stage.train_loop
    starts = []

    def interrupting(model, loader, **kw):
        starts.append(kw["start_epoch"])
        return real(model, _InterruptOnEpoch(loader, 2), **kw)

    opts = dict(relu_budget="3k", pretrain_epochs=3, limit=300, search_epochs=1, finetune_epochs=1, progress=False,
                out_dir=tmp_path / "out", export=False)
    monkeypatch.setattr(pretrain_stage, "train_loop", interrupting)
    with pytest.raises(Interrupted, match="state saved") as ei:
        api.compile("tinycnn", "synthetic", **opts)
    assert "pretrain" in ei.value.cause
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "pretrain" and state["epoch"] == 1

    def recording(model, loader, **kw):
        starts.append(kw["start_epoch"])
        return real(model, loader, **kw)

    monkeypatch.setattr(pretrain_stage, "train_loop", recording)
    res = api.compile("tinycnn", "synthetic", resume=True, **opts)
    assert starts == [0, 1] and res.report["pretrain"]["resumed_from_epoch"] == 1
    assert not (tmp_path / "out" / "checkpoint.pt").exists() and not (tmp_path / "out" / "pretrained.pt").exists()
    assert not (tmp_path / "off").exists() and not Path("off").exists()


def test_library_keywords_keep_working_with_a_config(tmp_path, rc_cache):
    import relucomp

    cfg = {"search": {"relu_budget": "2k", "epochs": 1}, "finetune": {"epochs": 0}, "data": {"limit": 300},
           "model": {"pretrain_epochs": 0}, "runtime": {"progress": False}}
    res = relucomp.compile("tinycnn", config=cfg, relu_budget=1000)  # the keyword wins over the dict
    assert res.report["relus"]["budget"] == 1000 and res.relus <= 1000 and res.config.search.epochs == 1
    with pytest.raises(RelucompError, match="unknown option"):
        relucomp.compile("tinycnn", config=cfg, relu_budgett=5)
