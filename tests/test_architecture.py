"""The shape of the code: a short driver, no import cycles, passes independent of the driver and CLI."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_IN_PASSES = {"relucomp.ir", "relucomp.infra", "relucomp.nn", "relucomp.errors",
                     # the training loop / checkpoints the training passes run on (itself free of driver and CLI)
                     "relucomp.train"}
#: data-file lookups, not code: pi_lowering reads relucomp/pi/cost_model.json (relucomp.pi imports nothing at import)
DATA_ONLY = {("relucomp.passes.pi_lowering", "relucomp.pi")}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (ROOT / "relucomp").rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    for p in (ROOT / "passes").glob("*.py"):
        mods["relucomp.passes" + ("" if p.stem == "__init__" else f".{p.stem}")] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path], *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module-level statements, including those nested in if/try blocks (not functions)
        stack, nodes = list(tree.body), []
        while stack:
            n = stack.pop()
            nodes.append(n)
            if isinstance(n, (ast.If, ast.Try, ast.With)):
                if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                    continue
                for field in ("body", "orelse", "finalbody", "handlers"):
                    stack.extend(getattr(n, field, []) or [])
            elif isinstance(n, ast.ExceptHandler):
                stack.extend(n.body)
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")
                base = base[: len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            for a in n.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
    return {m for m in out if m in mods}


def test_driver_is_short():
    """relucomp.compile and the stage runner are each well under 100 lines (AST)."""
    for rel, fn in (("relucomp/api.py", "compile"), ("relucomp/stages/__init__.py", "run")):
        tree = ast.parse((ROOT / rel).read_text())
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == fn)
        lines = node.end_lineno - node.lineno + 1
        assert lines < 100, f"{rel}:{fn} has {lines} lines"
    # and it really is a driver: no training loop in it
    assert "train_loop" not in (ROOT / "relucomp/api.py").read_text()


def test_stage_list_in_one_place():
    from relucomp import stages

    names = [s.name for s in stages.STAGES]
    assert names[:3] == ["data", "model", "pretrain"] and names[-2:] == ["export", "save"]
    assert len(names) == len(set(names))
    for mod in (ROOT / "relucomp" / "stages").glob("*.py"):
        if mod.stem not in ("__init__", "base"):
            assert f"\n    {mod.stem}" in (ROOT / "relucomp/stages/__init__.py").read_text() or mod.stem in \
                (ROOT / "relucomp/stages/__init__.py").read_text(), mod


def test_no_import_cycle_among_relucomp_modules():
    mods = _modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for dep in _imports(name, path, mods, top_level_only=True):
            if dep != name and not name.startswith(dep + "."):  # a submodule needs its package: not a cycle
                g.add_edge(name, dep)
    cycles = [c for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, cycles
    assert g.number_of_edges() > 50  # the graph is real


def test_cli_modules_import_only_app_and_library():
    mods = _modules()
    for name in ("relucomp.cli.compile", "relucomp.cli.sweep", "relucomp.cli.pi"):
        deps = _imports(name, mods[name], mods, top_level_only=False)
        assert not {d for d in deps if d.startswith("relucomp.cli") and d != "relucomp.cli.app"}, (name, deps)


def test_passes_import_only_ir_infra_nn_errors():
    mods = _modules()
    bad = {}
    for name, path in mods.items():
        if not name.startswith("relucomp.passes"):
            continue
        deps = {d for d in _imports(name, path, mods, top_level_only=False)
                if not d.startswith("relucomp.passes") and d not in ALLOWED_IN_PASSES and d != "relucomp"
                and (name, d) not in DATA_ONLY}
        if deps:
            bad[name] = deps
    assert not bad, bad
    # and what they may use does not reach back into the driver or the CLI
    for allowed in ALLOWED_IN_PASSES:
        deps = _imports(allowed, mods[allowed], mods, top_level_only=False)
        assert not {d for d in deps if d.split(".")[1:2] in (["api"], ["cli"], ["stages"], ["sweep"])}, (allowed, deps)


def test_atomic_write_gives_the_normal_mode(tmp_path):
    from relucomp.atomic import atomic_write, atomic_write_json, default_mode

    old = os.umask(0o022)
    try:
        p = atomic_write_json(tmp_path / "r.json", {"a": 1})
        assert stat.S_IMODE(p.stat().st_mode) == 0o644 == default_mode()
        def boom(tmp):
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            atomic_write(tmp_path / "x.bin", boom)
        assert sorted(q.name for q in tmp_path.iterdir()) == ["r.json"]  # nothing half-written left
    finally:
        os.umask(old)


def test_cache_off_switch(monkeypatch, tmp_path):
    from relucomp.cache import cache_dir, cache_root

    monkeypatch.setenv("RELUCOMP_CACHE", "off")
    assert cache_root() is None and cache_dir("models") is None
    monkeypatch.setenv("RELUCOMP_CACHE", str(tmp_path))
    assert cache_dir("models") == tmp_path / "models"


def test_python_dash_m_relucomp():
    r = subprocess.run([sys.executable, "-m", "relucomp", "version"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "0.1.0", r.stderr
