"""Shared helpers of the command-line tests: run ``relucomp`` in-process, check a one-line user error."""

from __future__ import annotations

from typer.testing import CliRunner

from relucomp.cli import app

runner = CliRunner()


def squash(s: str) -> str:
    """Drop all whitespace: rich wraps long messages at the console width."""
    return "".join(s.split())


def invoke(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def one_line_error(result, *fragments):
    """Exit status 2, an ``error:`` and a ``fix:`` line, no traceback, and every fragment in the message."""
    assert result.exit_code == 2, result.output
    text = squash(result.output)
    assert "error:" in text and "fix:" in text and "Traceback" not in result.output, result.output
    for f in fragments:
        assert squash(f) in text, (f, result.output)
