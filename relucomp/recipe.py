"""The accuracy recipe: effort presets, recipe defaults, and the embedded default weights.

Effort presets (``--effort``, ``runtime.effort``) set the schedule; explicit options override them
(:func:`relucomp.config.resolve_effort` fills the unset ones before the run):

==========  ========  ======  ========  ==========  =====================================
effort      pretrain  search  finetune  batch size  meant for
==========  ========  ======  ========  ==========  =====================================
quick       15        3       3         64          a CPU demo (the default; minutes on 2 cores)
standard    30        10      10        64          CPU runs worth quoting
paper       200       100     100       128         SNL's published schedule, for a GPU
==========  ========  ======  ========  ==========  =====================================

``paper`` follows SNL (Cho et al., ICML'22): a 200-epoch dense model, the
mask search, then 100 epochs of finetuning with CE + KD (T = 4).  The search
recipe (warm-up, importance-ranked pinning with hysteresis, refinement) and the
finetune recipe (KD temperature / weight, LR schedule, BN recalibration) are
in :data:`SEARCH_DEFAULTS` / :data:`FINETUNE_DEFAULTS`; every key is a keyword
argument of :class:`~relucomp.passes.snl_search.SNLSearchPass` /
:class:`~relucomp.passes.finetune.FinetunePass`.

The embedded default model (resnet8 trained on the built-in synthetic data
with the default seed and split) ships as ``relucomp/weights/*.pt`` — a plain
``state_dict`` loaded with ``torch.load(weights_only=True)`` after its sha256
is checked against the JSON next to it.  :func:`default_pretrained` returns it
only when the model and the data are exactly the defaults (the data is
identified by a fingerprint of its train/test split), so a changed split never
reuses it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


EFFORTS = ("quick", "standard", "paper")
DEFAULT_EFFORT = "quick"


@dataclass(frozen=True)
class Effort:
    pretrain_epochs: int
    search_epochs: int
    finetune_epochs: int
    batch_size: int


PRESETS: dict[str, Effort] = {
    # batch 64 on CPU: a short schedule needs steps more than large batches — on the synthetic default
    # (4,200 training images, seed 0) 3 + 3 epochs at batch 128 / 64 / 32 gave 82.4 / 91.4 / 90.9 % at 2k
    # (87.3 / 94.6 / – at 5k) in the same wall time
    "quick": Effort(pretrain_epochs=15, search_epochs=3, finetune_epochs=3, batch_size=64),
    "standard": Effort(pretrain_epochs=30, search_epochs=10, finetune_epochs=10, batch_size=64),
    "paper": Effort(pretrain_epochs=200, search_epochs=100, finetune_epochs=100, batch_size=128),
}

# Search recipe (SNLSearchPass keyword arguments).
SEARCH_DEFAULTS: dict[str, Any] = {
    "lr": 0.01,            # weights' SGD LR (search.lr).  Seed 0, same finetune: 0.01 / 0.02 / 0.04 gave
                           # 87.3 / 89.9 / 77.8 % at 5k, but 0.02 gave 70.6 % at 2k (0.01: 82.8 %): kept at 0.01
    "warmup": 0.15,        # fraction of the search steps trained before the first pin (gates and weights learn)
    "reach": 0.6,          # the pin schedule reaches the budget at this fraction of the search steps
    "check_every": 2,      # steps between pin updates (small, importance-ranked steps)
    "hysteresis": 0.05,    # a pinned entry re-opens only when its score beats a live one by this margin
    "refine": 3,           # rounds of discrete kept/linear swaps after binarization (0: off)
    "refine_fraction": 0.05,  # at most this fraction of the kept entries swapped per round
    "replacement": "affine",  # linearized entries become s·x + b per channel ("identity": SNL)
    "kd_weight": 0.5,
    "temperature": 4.0,
    "clip_grad_norm": 5.0,  # the weights' gradient norm cap (search.clip_grad_norm); see FINETUNE_DEFAULTS
}

# Finetune recipe (FinetunePass keyword arguments).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 0.01,             # SGD (Nesterov) peak LR at batch 64, scaled linearly with the batch (finetune_lr):
                            # batch 128: 0.005 / 0.01 / 0.02 / 0.05 gave 79.2 / – / 82.8 / 69.3 % at 2k and
                            # – / 85.6 / 87.3 / – % at 5k; batch 64: 0.005 / 0.01 / 0.02 gave 92.9 / 93.6 / 94.6 %
                            # at 5k and 95.7 / 96.4 / 93.8 % at 15k (synthetic resnet8, same searched mask, 3 epochs)
    "kd_weight": 0.7,       # weight of KD(teacher) vs CE
    "temperature": 4.0,     # KD temperature
    "lr_schedule": "cosine",  # cosine decay after a warm-up of warmup_epochs
    "warmup_epochs": 0.5,
    "bn_recalibrate": True,  # re-estimate BN statistics on train batches after the mask is fixed
    "clip_grad_norm": 5.0,  # gradient L2 norm cap per step.  As the pins remove most ReLUs the gradient norm
                            # jumps (median 3 → 8, max 69 at 2k); unclipped, a run could collapse (the 2-thread
                            # demo: train acc 41 % in the search's 2nd epoch, 71.3 % test after the finetune).
                            # Clipping search and finetune at 5: 90.7 % on that run; 1 thread, seed 0: 94.3 % at
                            # 5k and 95.6 % at 15k (93.9 / 95.9 % without)
}


FINETUNE_LR_BATCH = 64      # the batch size FINETUNE_DEFAULTS["lr"] is tuned for

# DP-SGD finetune recipe (the dp_finetune stage when ``finetune.lr`` is unset).  The LR is per unit of the
# clipping norm C: a step is lr / C · Σ clip_C(∇ℓ_i) / B = lr · Σ clip_1(∇ℓ_i / C) / B, so a clipped sample moves
# the weights by the same amount at every C and changing C changes only which samples are clipped (and the
# noise σ·C, which the 1/C cancels).  0.1 at batch 512 was chosen on validation in benchmarks/bench_dp.py
# (UTKFace resnet8, 4k ReLUs, ε = 8: 8 epochs at 0.1 over 1 / 4 epochs and 0.2; then C = 30 at 0.1 / 30 over
# C = 1, 3, 8 at 0.1 / C — dp_clip*.json) and scaled linearly with the expected batch as the finetune's.
DP_FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 0.1, "lr_batch": 512}


def dp_finetune_lr(batch_size: int, max_grad_norm: float) -> float:
    """The DP finetune's optimizer LR for an expected Poisson batch ``batch_size`` and clipping norm ``max_grad_norm``:
    ``0.1 × batch / 512 / C`` (:data:`DP_FINETUNE_DEFAULTS`)."""
    return DP_FINETUNE_DEFAULTS["lr"] * batch_size / DP_FINETUNE_DEFAULTS["lr_batch"] / max_grad_norm


def finetune_lr(batch_size: int) -> float:
    """The recipe's finetune peak LR for ``batch_size``: ``FINETUNE_DEFAULTS["lr"]`` scaled linearly with the
    batch (64 → 0.01, 128 → 0.02: the values tuned at each)."""
    return FINETUNE_DEFAULTS["lr"] * batch_size / FINETUNE_LR_BATCH


# ---------------------------------------------------------------------------
# embedded default weights
# ---------------------------------------------------------------------------

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = {"model": "resnet8", "seed": 0, "file": "resnet8_synthetic.pt", "meta": "resnet8_synthetic.json"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_fingerprint(bundle) -> str:
    """sha256 over the train and test split (images, labels, groups) and the normalisation."""
    h = hashlib.sha256()
    for ds in (bundle.train, bundle.test):
        for t in (ds.images, ds.labels, ds.groups):
            h.update(t.contiguous().numpy().tobytes())
        h.update(json.dumps([ds.mean, ds.std]).encode())
    return h.hexdigest()


def default_pretrained(model: str | None, bundle) -> dict[str, Any] | None:
    """The embedded trained weights when ``model`` and ``bundle`` are the defaults, else ``None``.

    ``model`` is the model spec (``None`` or ``"resnet8"`` = the default).  The
    weights file's sha256 is verified before loading (``weights_only=True``);
    a mismatch warns and returns ``None`` (the caller then pretrains).
    """
    if model not in (None, DEFAULT_WEIGHTS["model"]) or getattr(bundle, "name", None) != "synthetic":
        return None
    meta_path = WEIGHTS_DIR / DEFAULT_WEIGHTS["meta"]
    path = WEIGHTS_DIR / DEFAULT_WEIGHTS["file"]
    if not meta_path.exists() or not path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if bundle.num_classes != 10 or bundle_fingerprint(bundle) != meta["data_fingerprint"]:
        return None
    if file_sha256(path) != meta["sha256"]:
        warnings.warn(f"embedded weights {path.name} fail their checksum; pretraining instead", stacklevel=2)
        return None
    import torch  # here, not at the top: relucomp.config reads the presets before torch is imported

    return torch.load(path, map_location="cpu", weights_only=True)


def default_weights_info() -> dict[str, Any] | None:
    meta_path = WEIGHTS_DIR / DEFAULT_WEIGHTS["meta"]
    return json.loads(meta_path.read_text()) if meta_path.exists() else None
