"""Evaluate an existing compile output directory again (``relucomp evaluate OUT``).

:func:`evaluate_compiled` rebuilds the compiled model with
:func:`relucomp.load_compiled`, the data and the dense model from
``OUT/config.toml`` (the resolved config of the run: the same splits; the
dense model from the pretraining cache, or pretrained again the same seeded
way; for a ``--robust`` output the robust teacher, likewise from its cache), computes the robustness section (:mod:`relucomp.robustness`) and adds
it to ``OUT/report.json`` (atomic write).  The compile's own numbers are not
touched.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_write_json
from .compile_report import CompileReport
from .config import load_config, resolve_config, robustness_settings, validate
from .errors import RelucompError

__all__ = ["evaluate_compiled"]


def _read(out: Path) -> tuple[dict[str, Any], Path]:
    rep_path, cfg_path = out / "report.json", out / "config.toml"
    if not rep_path.is_file() or not cfg_path.is_file():
        raise RelucompError(f"{out} is not a finished relucomp compile output (no report.json / config.toml)",
                            "give the --out directory of a finished relucomp compile")
    try:
        return json.loads(rep_path.read_text()), cfg_path
    except ValueError as exc:
        raise RelucompError(f"{rep_path} is not valid JSON ({exc})", "compile again into a new --out") from None


def evaluate_compiled(out_dir: str | os.PathLike, *, model: Any = None, data: Any = None, dense: bool = True,
                      progress: bool = True, log: Callable[[str], None] | None = None,
                      **overrides: Any) -> CompileReport:
    """Add the ``robustness`` section to ``OUT/report.json`` of a finished compile; return the updated report.

    ``overrides``: robustness options under their keyword names
    (``corruptions``, ``severities``, ``robustness_samples``, ``robustness_split``, ``pgd_epsilon``,
    ``pgd_step``, ``pgd_steps``) or ``"section.field"``; ``seed`` is the run's.
    ``model`` / ``data``: the Python objects of a run compiled from objects.
    ``dense=False`` skips the dense model (no pretraining cache needed).
    """
    from .api import load_compiled, split_arguments
    from .stages import STAGES, run as run_stages
    from .stages.robustness import evaluate_models

    out = Path(out_dir)
    rep_dict, cfg_path = _read(out)
    hooks, values = split_arguments(model, data, {**overrides, "robustness.eval": True,
                                                  "runtime.out_dir": None, "runtime.resume": False,
                                                  "runtime.progress": progress})
    hooks.log = log
    cfg = validate(resolve_config(load_config(cfg_path), values), check_data=hooks.data is None)
    settings = robustness_settings(cfg)
    needs = tomllib.loads(cfg_path.read_text()).get("relucomp", {}).get("replay_needs_objects") or []
    if ("model" in needs and hooks.model is None) or ("data" in needs and hooks.data is None):
        raise RelucompError(f"{out} was compiled from Python objects (see its config.toml)",
                            "call relucomp.evaluate_compiled(OUT, model=..., data=...) with the same objects")
    # a --robust output: "dense" is the robust teacher (from its cache, or finetuned again the same seeded way)
    wanted = ("data", "model", "pretrain", "robust_teacher") if dense else ("data",)
    st = run_stages(cfg, hooks, stages=[s for s in STAGES if s.name in wanted])
    models = {"dense": st["pretrain"].teacher} if dense else {}
    models["compiled"] = load_compiled(out, model=hooks.model)
    from .train import progress_bar

    with progress_bar(progress) as bar:
        result = evaluate_models(models, st["data"].bundle, settings, split=cfg.robustness.split, progress=bar,
                                 say=log)
    rep_dict["robustness"] = result.to_dict()  # every other section kept as it was
    atomic_write_json(out / "report.json", rep_dict)
    return CompileReport.from_dict(rep_dict)
