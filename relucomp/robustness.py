"""Robustness evaluation: clean (CA), naturally-corrupted (NPA) and adversarial (AdvA) accuracy.

* **CA** — top-1 accuracy on the clean images of the evaluated test subset.
* **NPA** — accuracy on the CIFAR-10-C corruption families (Hendrycks &
  Dietterich 2019) produced by the maintained ``imagecorruptions`` package,
  at severities 1-5, averaged over every (corruption, severity) pair.  The
  corruptions are applied to the uint8 ``H x W x 3`` images at the model's
  input resolution, *before* normalisation.  ``imagecorruptions`` draws from
  numpy's global RNG: every image is corrupted under its own seed
  (``SeedSequence([seed, corruption, severity, image index])``) and the
  caller's RNG state is restored, so results are deterministic per seed and
  independent of batch size.
* **AdvA** — accuracy under a PGD L∞ attack (Madry et al. 2018; default
  ε = 8/255, step 2/255, 10 steps, uniform random start) written in plain
  torch.  The attack lives in pixel space [0, 1]: δ is projected onto the
  ε-ball and ``x + δ`` clipped to [0, 1] after every step, and the data's
  mean/std normalisation happens *inside* the attacked forward, so ε means
  what it means in the literature whatever the normalisation.

Every number is computed overall and per (fairness) group on one seeded
subset of the test split (``samples`` images; ``None`` = the whole split),
the same subset for every model, so dense and compiled are comparable.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DataError
from .evaluate import Predictions

__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "RobustnessSettings", "ModelRobustness", "RobustnessResult",
           "corrupt_images", "pgd_attack", "evaluate_robustness", "parse_epsilon", "resolve_corruptions",
           "check_rgb_images", "check_rgb_files"]

#: the 15 CIFAR-10-C / ImageNet-C benchmark corruptions (imagecorruptions' "common" set), by family order
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise",            # noise
               "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",   # blur
               "snow", "frost", "fog", "brightness",                       # weather
               "contrast", "elastic_transform", "pixelate", "jpeg_compression")  # digital
#: the 4 held-out "validation" corruptions imagecorruptions also provides
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
FAMILIES = {"noise": CORRUPTIONS[0:3], "blur": CORRUPTIONS[3:7], "weather": CORRUPTIONS[7:11],
            "digital": CORRUPTIONS[11:15], "extra": EXTRA_CORRUPTIONS}
SEVERITIES = (1, 2, 3, 4, 5)


# --------------------------------------------------------------------------- settings and validation

def parse_epsilon(value: Any, what: str = "--pgd-epsilon") -> float:
    """``8/255`` (string), ``0.031`` or ``Fraction`` → a float in pixel units [0, 1); refuses 8 meaning 8/255."""
    if isinstance(value, str):
        try:
            v = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{what} {value!r} is not a number", f"give e.g. {what} 8/255") from None
    else:
        v = float(value)
    if v != v or v in (float("inf"), float("-inf")) or v < 0:
        raise ConfigError(f"{what} {value!r} must be a non-negative number of pixel units", f"give e.g. {what} 8/255")
    if v >= 1:
        raise ConfigError(f"{what} {value!r} is in 0-255 units, but images are attacked in [0, 1]",
                          f"use {what} {_fmt255(v)}/255")
    return v


def _fmt255(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def resolve_corruptions(value: Sequence[str] | str | None) -> tuple[str, ...]:
    """``"all"`` / ``None`` → the 15 benchmark corruptions; ``"extra"`` adds the 4 held-out ones; names or
    family names (noise, blur, weather, digital) otherwise.  Unknown names are refused, listing the valid ones."""
    if value is None:
        return CORRUPTIONS
    items = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if str(s).strip()]
    out: list[str] = []
    for it in items:
        key = it.lower().replace("-", "_")
        if key == "all":
            out += CORRUPTIONS
        elif key in ("all+extra", "every"):
            out += CORRUPTIONS + EXTRA_CORRUPTIONS
        elif key in FAMILIES:
            out += FAMILIES[key]
        elif key in CORRUPTIONS or key in EXTRA_CORRUPTIONS:
            out.append(key)
        else:
            raise ConfigError(f"unknown corruption {it!r}",
                              "use all, a family (noise, blur, weather, digital, extra) or any of "
                              + ", ".join(CORRUPTIONS + EXTRA_CORRUPTIONS))
    if not out:
        raise ConfigError("--corruptions is empty", "give --corruptions all, or e.g. gaussian_noise,fog")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class RobustnessSettings:
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    samples: int | None = 1000        # test images evaluated (seeded subset); None = the whole test split
    pgd_epsilon: float = 8 / 255
    pgd_step: float = 2 / 255
    pgd_steps: int = 10
    pgd_random_start: bool = True
    batch_size: int = 256
    seed: int = 0

    @classmethod
    def make(cls, *, corruptions: Sequence[str] | str | None = "all", severities: Sequence[int] | str | None = None,
             samples: int | None = 1000, pgd_epsilon: Any = "8/255", pgd_step: Any = "2/255", pgd_steps: int = 10,
             seed: int = 0, batch_size: int = 256) -> "RobustnessSettings":
        """Validated settings (:class:`~relucomp.errors.ConfigError` with the fix on bad values)."""
        sev = SEVERITIES if severities is None else severities
        if isinstance(sev, str):
            try:
                sev = [int(s) for s in sev.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--severities {severities!r} is not a list of integers",
                                  "give e.g. --severities 1,3,5") from None
        sev = tuple(dict.fromkeys(int(s) for s in sev))
        if not sev or any(s not in SEVERITIES for s in sev):
            raise ConfigError(f"severities {list(sev)} must be among 1-5", "give e.g. --severities 1,2,3,4,5")
        if samples is not None and samples < 1:
            raise ConfigError(f"--robustness-samples {samples} must be ≥ 1",
                              "give e.g. --robustness-samples 1000 (or leave it unset for the whole test split)")
        if pgd_steps < 0:
            raise ConfigError(f"--pgd-steps {pgd_steps} must be ≥ 0", "give e.g. --pgd-steps 10")
        eps, step = parse_epsilon(pgd_epsilon), parse_epsilon(pgd_step, "--pgd-step")
        if pgd_steps > 0 and eps > 0 and step <= 0:
            raise ConfigError("--pgd-step 0 never moves the attack", "give e.g. --pgd-step 2/255")
        return cls(corruptions=resolve_corruptions(corruptions), severities=sev, samples=samples, pgd_epsilon=eps,
                   pgd_step=step, pgd_steps=int(pgd_steps), seed=int(seed), batch_size=int(batch_size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["corruptions"], d["severities"] = list(self.corruptions), list(self.severities)
        return d


_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La"}


def check_rgb_files(root, *, peek: int = 8) -> None:
    """Refuse a folder of greyscale images (read from the first few files' headers, no decoding)."""
    import os

    from PIL import Image

    from .data.decode import is_image_name

    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if not is_image_name(f) or f.startswith("."):
                continue
            try:
                with Image.open(os.path.join(dirpath, f)) as im:
                    mode = im.mode
            except (OSError, SyntaxError, ValueError):
                continue
            if mode in _GREY_MODES:
                raise DataError(f"{os.path.join(dirpath, f)} is a greyscale image (mode {mode}); the corruption "
                                "benchmark (CIFAR-10-C) is defined on RGB images",
                                "evaluate robustness on RGB data, or drop --eval-robustness")
            seen += 1
            if seen >= peek:
                return


def check_rgb_images(images: Tensor, where: str = "the data") -> None:
    """Refuse images that are not RGB: not ``N x 3 x H x W`` uint8, or grey (all three channels equal)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"{where} has images of shape {tuple(images.shape)} ({images.dtype}), not RGB uint8",
                        "evaluate robustness on RGB images (N x 3 x H x W), or drop --eval-robustness")
    sample = images[:256]
    if sample.numel() and torch.equal(sample[:, 0], sample[:, 1]) and torch.equal(sample[:, 1], sample[:, 2]):
        raise DataError(f"{where} holds greyscale images (the three channels are equal); the corruption "
                        "benchmark (CIFAR-10-C) is defined on RGB images",
                        "evaluate robustness on RGB data, or drop --eval-robustness")


# --------------------------------------------------------------------------- corruptions

_OWN_RNG = ("glass_blur", "impulse_noise")


def _imagecorruptions():
    try:
        from imagecorruptions import corrupt
    except ImportError as exc:  # absent, or the unmaintained 1.1.2 (needs pkg_resources)
        raise ConfigError(f"--eval-robustness needs a working imagecorruptions package ({exc})",
                          "pip install 'relucomp[robust]' (imagecorruptions-imaug, the maintained fork)") from None
    return corrupt


class _CorruptionMemo:
    """In-process memo of corrupted sets: the dense and the compiled model of every compile in one process (a
    sweep, a benchmark) see the same test images, and some corruptions cost ~50 ms an image (glass blur).
    Keyed by the images' bytes, their indices, corruption, severity and seed; bounded in bytes, oldest out."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes, self.items, self.size, self.hits = max_bytes, {}, 0, 0

    @staticmethod
    def key(images: Tensor, idx: Sequence[int], corruption: str, severity: int, seed: int) -> tuple:
        h = hashlib.sha256(images.contiguous().numpy().tobytes())
        h.update(np.asarray(list(idx), dtype=np.int64).tobytes())
        return (h.hexdigest(), tuple(images.shape), corruption, int(severity), int(seed))

    def get(self, key: tuple) -> Tensor | None:
        hit = self.items.get(key)
        if hit is not None:
            self.hits += 1
            return hit.clone()
        return None

    def put(self, key: tuple, value: Tensor) -> None:
        n = value.numel() * value.element_size()
        if n > self.max_bytes:
            return
        while self.items and self.size + n > self.max_bytes:
            old = self.items.pop(next(iter(self.items)))
            self.size -= old.numel() * old.element_size()
        self.items[key] = value.clone()
        self.size += n


_MEMO = _CorruptionMemo()


def corrupt_images(images: Tensor, corruption: str, severity: int, *, seed: int = 0,
                   indices: Sequence[int] | None = None, cache: bool = True) -> Tensor:
    """Corrupt uint8 ``N x 3 x H x W`` images with ``imagecorruptions`` (deterministic per seed and image).

    ``indices`` names each image (default ``0..N-1``): an image's corruption
    depends only on (seed, corruption, severity, its index), never on the batch.
    numpy's global RNG state is restored afterwards.  ``cache``: reuse a set
    corrupted earlier in this process (an exact copy; see :class:`_CorruptionMemo`).
    """
    corrupt = _imagecorruptions()
    names = CORRUPTIONS + EXTRA_CORRUPTIONS
    if corruption not in names:
        raise ConfigError(f"unknown corruption {corruption!r}", "use one of " + ", ".join(names))
    cidx = names.index(corruption)
    idx = range(images.shape[0]) if indices is None else [int(i) for i in indices]
    key = _MEMO.key(images, idx, corruption, severity, seed) if cache else None
    if key is not None and (hit := _MEMO.get(key)) is not None:
        return hit
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    out = np.empty_like(hwc)
    state = np.random.get_state()
    try:
        for k, (img, i) in enumerate(zip(hwc, idx)):
            s = int(np.random.SeedSequence([seed, cidx, severity, i]).generate_state(1)[0])
            np.random.seed(s)
            # glass_blur and impulse_noise draw from their own generators: they take the seed directly
            kw = {"seed": s} if corruption in _OWN_RNG else {}
            out[k] = corrupt(img, corruption_name=corruption, severity=int(severity), **kw)
    finally:
        np.random.set_state(state)
    result = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    if key is not None:
        _MEMO.put(key, result)
    return result


# --------------------------------------------------------------------------- PGD

class Normalized(nn.Module):
    """``model`` preceded by the data's normalisation: a forward on pixel-space [0, 1] inputs."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, *, epsilon: float = 8 / 255, step: float = 2 / 255,
               steps: int = 10, random_start: bool = True, generator: torch.Generator | None = None,
               loss: Callable[[Tensor, Tensor], Tensor] | None = None,
               on_step: Callable[[int, float], None] | None = None) -> Tensor:
    """PGD L∞ (untargeted, cross-entropy) on pixel-space inputs ``x`` in [0, 1].

    ``model`` takes pixel-space inputs (wrap a normalised model in
    :class:`Normalized`).  Returns ``x_adv`` with ``‖x_adv − x‖∞ ≤ epsilon``
    and ``0 ≤ x_adv ≤ 1``.  ``loss(logits, y)`` replaces the cross-entropy (e.g. TRADES' KL);
    ``on_step(i, loss)`` reports progress.  The model's mode and parameters' ``requires_grad``
    are restored.
    """
    was = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x = x.detach()
        if random_start and epsilon > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
            adv = (x + epsilon * noise.to(x.device)).clamp(0, 1)
        else:
            adv = x.clone()
        lo, hi = (x - epsilon).clamp(min=0), (x + epsilon).clamp(max=1)
        for i in range(steps):
            adv.requires_grad_(True)
            with torch.enable_grad():
                out = model(adv)
                obj = F.cross_entropy(out, y) if loss is None else loss(out, y)
                (grad,) = torch.autograd.grad(obj, adv)
            adv = torch.max(torch.min(adv.detach() + step * grad.sign(), hi), lo)
            if on_step is not None:
                on_step(i + 1, float(obj.detach()))
        return adv.detach()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was)


# --------------------------------------------------------------------------- evaluation

@dataclass
class ModelRobustness:
    """One model's robustness (points): overall and per group."""

    ca: float
    npa: float | None
    adva: float | None
    npa_by_corruption: dict[str, float] = field(default_factory=dict)   # mean over the severities
    npa_by_severity: dict[str, float] = field(default_factory=dict)     # mean over the corruptions
    groups: dict[str, dict[str, float | None]] = field(default_factory=dict)  # group -> {ca, npa, adva}


@dataclass
class RobustnessResult:
    """The report's ``robustness`` section (``to_dict`` / ``from_dict`` round-trip through report.json)."""

    settings: dict[str, Any]
    samples: int
    groups: list[str]
    group_counts: dict[str, int]
    models: dict[str, ModelRobustness]
    seconds: float = 0.0
    robust_compile: dict[str, Any] | None = None   # --robust: teacher, schedule, dual BN (stage robustness)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RobustnessResult":
        return cls(**{**d, "models": {k: ModelRobustness(**v) for k, v in d["models"].items()}})


def _subset(n: int, samples: int | None, seed: int) -> Tensor:
    if samples is None or samples >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values


def _predict(models: dict[str, nn.Module], x01: Tensor, y: Tensor, batch: int) -> dict[str, Tensor]:
    out = {}
    with torch.no_grad():
        for name, m in models.items():
            out[name] = torch.cat([m(x01[s:s + batch]).argmax(1) for s in range(0, len(y), batch)])
    return out


def _group_table(preds: dict[str, list[Tensor]], y: Tensor, g: Tensor, names: list[str]) -> dict[str, list]:
    """Per model: per group mean accuracy over the conditions in ``preds[model]`` (the one evaluator)."""
    table = {}
    for model, plist in preds.items():
        accs = [Predictions(y, p, g, 0.0).group_acc(len(names)) for p in plist]
        table[model] = [None if any(a[i] is None for a in accs) else float(np.mean([a[i] for a in accs]))
                        for i in range(len(names))]
    return table


def evaluate_robustness(models: dict[str, nn.Module], dataset, settings: RobustnessSettings | None = None, *,
                        progress: Callable[[str, int, int], None] | None = None) -> RobustnessResult:
    """CA, NPA and AdvA of every model in ``models`` (name → model on normalised inputs) on ``dataset``.

    ``dataset``: a :class:`~relucomp.data.GroupedDataset` (uint8 RGB images,
    labels, groups, mean/std); the same seeded subset of at most
    ``settings.samples`` images serves every model and condition.
    ``progress(what, done, total)`` is called after each condition.
    """
    s = settings or RobustnessSettings()
    t0 = time.perf_counter()
    check_rgb_images(dataset.images, "the test split")
    idx = _subset(len(dataset), s.samples, s.seed)
    images, y, g = dataset.images[idx], dataset.labels[idx], dataset.groups[idx]
    names = list(dataset.group_names)
    wrapped = {k: Normalized(m, dataset.mean, dataset.std).eval() for k, m in models.items()}
    conds = [(c, sev) for c in s.corruptions for sev in s.severities]
    total, done = len(conds) + 2, 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(what, done, total)

    clean = _predict(wrapped, images.float() / 255, y, s.batch_size)
    tick("clean")
    corrupted: dict[str, list[Tensor]] = {k: [] for k in models}
    for c, sev in conds:
        xc = corrupt_images(images, c, sev, seed=s.seed, indices=idx.tolist()).float() / 255
        for k, p in _predict(wrapped, xc, y, s.batch_size).items():
            corrupted[k].append(p)
        tick(f"{c} (severity {sev})")
    adv: dict[str, Tensor] = {}
    gen = torch.Generator().manual_seed(s.seed)
    for k, m in wrapped.items():
        gen.manual_seed(s.seed)  # the same random start for every model
        preds = []
        for st in range(0, len(y), s.batch_size):
            x01, yb = images[st:st + s.batch_size].float() / 255, y[st:st + s.batch_size]
            xa = pgd_attack(m, x01, yb, epsilon=s.pgd_epsilon, step=s.pgd_step, steps=s.pgd_steps, generator=gen)
            with torch.no_grad():
                preds.append(m(xa).argmax(1))
        adv[k] = torch.cat(preds)
    tick("PGD")

    acc = lambda p: 100.0 * float((p == y).float().mean()) if len(y) else 0.0  # noqa: E731
    g_clean = _group_table({k: [p] for k, p in clean.items()}, y, g, names)
    g_npa = _group_table(corrupted, y, g, names) if conds else None
    g_adv = _group_table({k: [p] for k, p in adv.items()}, y, g, names)
    out: dict[str, ModelRobustness] = {}
    for k in models:
        per = [acc(p) for p in corrupted[k]]
        by_c = {c: float(np.mean([a for (cc, _), a in zip(conds, per) if cc == c])) for c in s.corruptions} if conds else {}
        by_s = {str(v): float(np.mean([a for (_, ss), a in zip(conds, per) if ss == v])) for v in s.severities} if conds else {}
        groups = {n: {"ca": g_clean[k][i], "npa": g_npa[k][i] if g_npa else None, "adva": g_adv[k][i]}
                  for i, n in enumerate(names)}
        out[k] = ModelRobustness(ca=acc(clean[k]), npa=float(np.mean(per)) if per else None, adva=acc(adv[k]),
                                 npa_by_corruption=by_c, npa_by_severity=by_s, groups=groups)
    counts = torch.bincount(g, minlength=len(names)).tolist()
    return RobustnessResult(settings={**s.to_dict(), "attack": "PGD L-inf, pixel space [0,1], normalised inside the "
                                      "forward, cross-entropy, uniform random start"},
                            samples=int(len(y)), groups=names, group_counts=dict(zip(names, map(int, counts))),
                            models=out, seconds=round(time.perf_counter() - t0, 3))
