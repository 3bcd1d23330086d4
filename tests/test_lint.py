"""Static checks: pyflakes' rules (undefined names, unused imports, bad ``__all__``) and syntax errors, via ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_no_undefined_names_or_unused_imports():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9", "--no-cache",
                        "--output-format", "concise", "relucomp", "passes", "benchmarks", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
