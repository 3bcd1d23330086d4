"""Stage ``save`` (with an output directory): report.json, config.toml, splits.json; then drop the checkpoint.

Written last, with the one atomic-write helper, so a failed run leaves no
``report.json`` / ``splits.json`` behind and ``report.json`` holds every
stage's time (``phases_seconds``), export included.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..atomic import atomic_write_json, atomic_write_text
from ..config import to_toml
from .base import RunState

NAME = "save"


def when(st: RunState) -> bool:
    from ..distributed import is_main

    return st.out is not None and is_main()  # multi-process: rank 0 writes


def run(st: RunState) -> Path:
    out, rep = st.out, st["report"]
    st["data"].bundle.save_splits(out / "splits.json")
    objects = [w for w, o in (("model", st.hooks.model), ("data", st.hooks.data)) if o is not None]
    header = {"version": __version__, "model": rep.model,
              # a Python object is not configuration: replay needs the same object passed again
              "replay_needs_objects": objects or None}
    atomic_write_text(out / "config.toml", to_toml(st.cfg.with_values({"runtime.resume": False}), header=header))
    rep.phases_seconds = dict(st.phases)
    atomic_write_json(out / "report.json", rep.to_dict())
    st.ckpt.clear()
    (out / "pretrained.pt").unlink(missing_ok=True)
    return out / "report.json"
