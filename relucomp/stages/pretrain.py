"""Stage ``pretrain``: train an untrained model on the data (cached; checkpointed every epoch).

The cache key (``$RELUCOMP_CACHE/models``) includes the data's content
digest, the model file's digest (``file.py:factory``) and the relucomp
version, so a stale pretrained model is never reused.  With ``--out`` the
state is saved to ``OUT/checkpoint.pt`` before the first epoch and after
each one, so Ctrl-C + ``--resume`` continues exactly where the last finished
epoch left off; the finished weights are kept in ``OUT/pretrained.pt`` until
the run ends (a resume in a later phase reloads the same teacher).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..cache import cache_dir
from ..errors import RelucompError
from ..loaders import BatchLoader
from ..train import Checkpointer, ce_kd_step, load_state, make_optimizer, train_loop
from .base import RunState

NAME = "pretrain"
DEFAULT_EPOCHS = 15


@dataclass
class PretrainOut:
    teacher: nn.Module                       # the dense model, frozen, eval mode
    info: dict[str, Any] = field(default_factory=dict)
    epochs: int = 0


def epochs_for(st: RunState) -> int:
    e = st.cfg.model.pretrain_epochs
    return e if e is not None else (0 if st["model"].trained else DEFAULT_EPOCHS)


def data_digest(bundle) -> str:
    h = hashlib.sha1()
    for t in (bundle.train.images, bundle.train.labels, bundle.train.groups):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(st: RunState, epochs: int) -> str | None:
    m, d, cfg = st["model"], st["data"], st.cfg
    if m.spec is None or m.trained:
        return None
    spec = m.spec
    file_digest = None
    left = spec.rpartition(":")[0]
    if left and Path(left).is_file():
        file_digest = hashlib.sha1(Path(left).read_bytes()).hexdigest()[:12]
    material = [spec, file_digest, d.bundle.name, data_digest(d.bundle), d.num_classes, cfg.data.image_size,
                cfg.runtime.seed, epochs, cfg.runtime.batch_size, cfg.model.pretrain_lr, __version__]
    digest = hashlib.sha1(json.dumps(material, default=str).encode()).hexdigest()[:12]
    return f"{spec.replace('/', '_').replace(':', '_')[-60:]}-{d.bundle.name}-{digest}"


def _teacher(model: nn.Module) -> nn.Module:
    model = model.cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pretrain(model: nn.Module, bundle, *, epochs: int, lr: float = 0.05, batch_size: int = 128, seed: int = 0,
             progress: Any = None, cache_path: Path | None = None, ckpt: Checkpointer | None = None,
             resume: dict | None = None, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Train ``model`` on ``bundle``; reuse/write ``cache_path``; checkpoint every epoch to ``ckpt``."""
    if cache_path is not None and cache_path.exists():
        try:
            state = load_state(cache_path)
            model.load_state_dict(state["state_dict"])
            return model, {"cached": str(cache_path), **state.get("info", {})}
        except (RelucompError, KeyError, RuntimeError):
            cache_path.unlink(missing_ok=True)
    torch.manual_seed(seed)
    loader = BatchLoader(bundle.train, batch_size=batch_size, shuffle=True, augment=True, seed=seed)
    opt = make_optimizer(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * len(loader)))
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        loader.generator.set_state(resume["generator"])
        torch.set_rng_state(resume["rng"])
        start = int(resume["epoch"])

    def save(next_epoch: int, interrupted: bool) -> None:
        if ckpt is None or ckpt.path is None or interrupted:  # on Ctrl-C the last epoch's state is already saved
            return
        ckpt.save({"phase": NAME, "epoch": next_epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict(), "generator": loader.generator.get_state(),
                   "rng": torch.get_rng_state()})

    save(start, False)
    hist = train_loop(model.to(device), loader, epochs=epochs, start_epoch=start, optimizer=opt,
                      step_fn=ce_kd_step(None), desc="pretrain", progress=progress, after_step=lambda s: sched.step(),
                      save=save if ckpt is not None and ckpt.path is not None else None, device=device)
    model.cpu()
    info = {"epochs": epochs, "train_acc": hist[-1]["train_acc"] if hist else None, "resumed_from_epoch": start or None}
    if cache_path is not None:
        Checkpointer(cache_path).save({"state_dict": model.state_dict(), "info": info})
    return model, info


def run(st: RunState) -> PretrainOut:
    m, cfg = st["model"], st.cfg
    epochs = epochs_for(st)
    if epochs <= 0:
        return PretrainOut(teacher=_teacher(copy.deepcopy(m.model)), epochs=0)
    done = Checkpointer(st.out / "pretrained.pt" if st.out is not None else None)
    if cfg.runtime.resume and done.path is not None and done.path.exists():  # interrupted in a later phase
        state = done.load()
        m.model.load_state_dict(state["state_dict"])
        return PretrainOut(teacher=_teacher(copy.deepcopy(m.model)), info=state["info"], epochs=epochs)
    key = cache_key(st, epochs)
    models = cache_dir("models")
    path = models / f"{key}.pt" if key is not None and models is not None else None
    st.say(f"pretraining {m.spec or 'model'} for {epochs} epochs" + (" (cached)" if path is not None else ""))
    model, info = pretrain(m.model, st["data"].bundle, epochs=epochs, lr=cfg.model.pretrain_lr,
                           batch_size=cfg.runtime.batch_size, seed=cfg.runtime.seed, progress=st.progress,
                           cache_path=path, ckpt=st.ckpt, resume=st.resuming(NAME), device=cfg.runtime.device)
    done.save({"state_dict": model.state_dict(), "info": info})
    return PretrainOut(teacher=_teacher(copy.deepcopy(model)), info=info, epochs=epochs)
