"""The `relucomp` command line (typer CliRunner): inspect, compile, and user errors (exit 2 + fix)."""

from __future__ import annotations

import json

import pytest
import torch
import relucomp.api as api
from relucomp.cli import app
from relucomp.errors import BudgetError
from relucomp.export import export_onnx
from relucomp.models import tinycnn

from _cli import invoke, squash
from _cli import one_line_error as assert_user_error

QUICK = ["--limit", "300", "--pretrain-epochs", "0", "--epochs", "1", "--finetune-epochs", "1", "--no-progress"]


def test_inspect_resnet18_json():
    r = invoke(["inspect", "resnet18", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["total"]["relus"] == 557_056
    assert info["total"]["macs"] == 555_422_720
    assert len([row for row in info["layers"] if row["kind"] == "relu"]) == 17


def test_inspect_table():
    r = invoke(["inspect", "tinycnn"])
    assert r.exit_code == 0, r.output
    assert "block.relu2" in r.stdout and "total:20,480ReLUs" in squash(r.stdout)


def test_inspect_shows_ungated_comparisons_and_budget_flag(tmp_path):
    f = tmp_path / "act.py"
    f.write_text("import torch\nfrom torch import nn\n\n"
                 "def make(num_classes=10):\n"
                 "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 4, 3, padding=1),\n"
                 "                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes))\n")
    r = invoke(["inspect", f"{f}:make", "--image-size", "8"])
    assert r.exit_code == 0, r.output
    text = squash(r.stdout)
    assert "othercomparisons(notgated)" in text and "512relu6" in text  # 4x8x8 elements, 2 bounds each
    assert "512comparisonsnogatecontrols" in text and "total:256ReLUs" in text
    import typer

    cli = typer.main.get_command(app)
    for cmd in ("compile", "sweep"):
        assert any("--budget-includes-maxpool" in p.opts for p in cli.commands[cmd].params), cmd
    r = invoke(["compile", "-b", "1k", "--budget-includes-maxpool", "--print-config"])
    assert r.exit_code == 0, r.output
    assert "budget_includes_maxpool = true" in r.stdout


def test_inspect_onnx_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.onnx"
    export_onnx(tinycnn().eval(), path, example=torch.randn(1, 3, 32, 32), metadata={"relu_budget": 20480})
    r = invoke(["inspect", path, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["total"]["relus"] == 20_480
    assert sum(row["relus"] for row in info["layers"] if row["kind"] == "relu") == 20_480
    assert info["metadata"]["relu_budget"] == 20480 and info["metadata"]["onnx_relu_count"] == 20_480
    assert any(row["kind"] == "conv" and row["macs"] > 0 for row in info["layers"])
    r = invoke(["inspect", tmp_path / "missing.onnx"])
    assert_user_error(r, "does not exist")


def test_compile_cli_end_to_end(tmp_path, rc_cache):
    out = tmp_path / "out"
    r = invoke(["compile", "tinycnn", "-b", "2k", "--out", out, *QUICK])
    assert r.exit_code == 0, r.output
    assert (out / "model.onnx").is_file() and (out / "report.json").is_file()
    rep = json.loads((out / "report.json").read_text())
    assert rep["relus"]["after"] <= 2000
    assert "relucompcompile" in squash(r.stdout) and "budget2,000" in squash(r.stdout)


def test_budget_above_relu_count(tmp_path, rc_cache):
    r = invoke(["compile", "tinycnn", "-b", "30k", "--out", tmp_path / "o", *QUICK])
    assert_user_error(r, "ReLU budget 30,000 is above the model's 20,480 ReLUs", "≤ 20,480")


def test_budget_not_a_number(tmp_path, rc_cache):
    r = invoke(["compile", "tinycnn", "-b", "abc", "--out", tmp_path / "o", *QUICK])
    assert_user_error(r, "cannot parse ReLU budget 'abc'", "15k")


def test_unknown_architecture(tmp_path, rc_cache):
    r = invoke(["compile", "resnet19", "-b", "2k", "--out", tmp_path / "o", *QUICK])
    assert_user_error(r, "unknown architecture 'resnet19'", "did you mean 'resnet18'")
    r = invoke(["inspect", "resnet19"])
    assert_user_error(r, "unknown architecture")


def test_missing_checkpoint(tmp_path, rc_cache):
    r = invoke(["compile", "tinycnn", "-b", "2k", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "o", *QUICK])
    assert_user_error(r, "nope.pt", "not found")


def test_corrupt_checkpoint(tmp_path, rc_cache):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00\x01garbage bytes, not a zip or pickle\xff" * 10)
    r = invoke(["compile", "tinycnn", "-b", "2k", "--checkpoint", bad, "--out", tmp_path / "o", *QUICK])
    assert_user_error(r, "bad.pt", "corrupt or unreadable", "torch.save")
    r = invoke(["inspect", "tinycnn", "--checkpoint", bad])
    assert_user_error(r, "corrupt")


UNTRACEABLE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def make(num_classes=10):
    return Net(num_classes)
'''

ONE_CHANNEL = '''
from torch import nn


def make(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
'''


def test_untraceable_model_names_the_line(tmp_path, rc_cache):
    f = tmp_path / "usermodel.py"
    f.write_text(UNTRACEABLE)
    line = UNTRACEABLE.splitlines().index("        if x.sum() > 0:") + 1
    r = invoke(["compile", f"{f}:make", "-b", "100", "--out", tmp_path / "o", *QUICK])
    assert_user_error(r, "torch.fx cannot trace Net", f"usermodel.py:{line}", "if x.sum() > 0", "leaf")
    r = invoke(["inspect", f"{f}:make"])
    assert_user_error(r, f"usermodel.py:{line}")


def test_wrong_input_shape(tmp_path, rc_cache):
    f = tmp_path / "onechannel.py"
    f.write_text(ONE_CHANNEL)
    r = invoke(["compile", f"{f}:make", "-b", "100", "--out", tmp_path / "o", *QUICK])
    assert_user_error(r, "does not accept inputs of shape (2, 3, 32, 32)", "3-channel")


def test_unwritable_out(tmp_path, rc_cache):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    r = invoke(["compile", "tinycnn", "-b", "2k", "--out", blocker / "out", *QUICK])
    assert_user_error(r, "cannot write to output directory", "writable")
    assert blocker.read_text() == "x"


def test_version():
    from relucomp import __version__

    for args in (["version"], ["--version"], ["--version", "compile"]):   # --version is eager: nothing else runs
        r = invoke(args)
        assert r.exit_code == 0 and r.stdout.strip() == __version__ == "0.1.0", (args, r.output)


# --------------------------------------------------------------------------- regressions (bugs found by these tests)

def test_error_message_keeps_brackets_in_paths(tmp_path, rc_cache):
    d = tmp_path / "ckpt[v2]"
    d.mkdir()
    r = invoke(["inspect", "tinycnn", "--checkpoint", d / "missing.pt"])
    assert_user_error(r, "ckpt[v2]")


def test_bad_budget_fails_before_pretraining(monkeypatch, rc_cache):
    def no_pretrain(*a, **k):
        raise AssertionError("pretrained before validating the budget")

    import relucomp.stages.pretrain as pretrain_stage

    monkeypatch.setattr(pretrain_stage, "pretrain", no_pretrain)
    with pytest.raises(BudgetError):
        api.compile("tinycnn", "synthetic", relu_budget="abc", pretrain_epochs=5, limit=300, progress=False)


def test_inspect_wrong_input_shape(tmp_path):
    f = tmp_path / "onechannel.py"
    f.write_text(ONE_CHANNEL)
    r = invoke(["inspect", f"{f}:make"])
    assert_user_error(r, "does not accept inputs of shape")


def test_compile_help_groups_options_by_config_section():
    import re

    text = invoke(["compile", "--help"], env={"COLUMNS": "160"}).output
    panels = re.findall(r"─ ([A-Z][\w ]+) · \[(\w+)\] ─", text)
    assert {sec for _, sec in panels} == {"data", "model", "search", "finetune", "fairness", "robustness", "dp",
                                          "pruning", "export", "runtime"}, panels
    robustness = text.split("Robustness · [robustness]")[1].split("╰")[0]
    assert "--pgd-epsilon" in robustness and "--robust " in robustness and "--relu-budget" not in robustness
    assert "--relu-budget" in text.split("Mask search · [search]")[1].split("╰")[0]
    assert "--section.field VALUE" in squash(text) or "--section.fieldVALUE" in squash(text)
    # the shared option objects were copied: other commands keep one plain panel
    assert "·" not in invoke(["evaluate", "--help"], env={"COLUMNS": "160"}).output


def test_every_option_of_every_command_says_what_it_does():
    """`relucomp CMD --help` has a help line for each option (the section overrides `--section.field` are listed
    in one shared help paragraph, not as options)."""
    import typer
    from typer.core import TyperOption

    root = typer.main.get_command(app)
    missing = []
    for name, cmd in root.commands.items():
        subs = cmd.commands.items() if hasattr(cmd, "commands") else [(None, cmd)]
        for sub, c in subs:
            for p in c.params:
                if isinstance(p, TyperOption) and not p.hidden and not (p.help or "").strip():
                    missing.append(f"relucomp {name}{' ' + sub if sub else ''} {p.opts[0]}")
    assert len(root.commands) >= 8
    assert not missing, missing
