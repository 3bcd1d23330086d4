"""The validated compile configuration: one :class:`CompileConfig`, read from TOML, flags and keywords.

Sections: ``data``, ``model``, ``search``, ``finetune``, ``fairness``,
``robustness``, ``dp``, ``pruning``, ``export``, ``runtime``.  Every field has
a default; a TOML file (``relucomp compile --config run.toml``) sets some,
command-line flags / keyword overrides set others (they win), and
:func:`validate` checks every option up front — in well under 2 s, before any
data is decoded or any model trained.  ``OUT/config.toml`` holds the resolved
config of a run; ``relucomp compile --config OUT/config.toml --out OUT2``
replays it.

Adding an option = one line in its section class below (name, type, default;
``None`` means "off/auto" and must be the default of any optional field, since
TOML has no null), plus, if the old keyword API or the CLI should reach it,
one entry in :data:`KEYWORDS` (``keyword -> "section.field"``) and a check in
:func:`validate`.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import ConfigError, DataError
from .keywords import KEYWORDS

__all__ = ["CompileConfig", "load_config", "resolve_config", "resolve_effort", "validate", "to_toml", "KEYWORDS",
           "check_dp", "GRANULARITIES", "SEARCH_METHODS", "FAIR_METHODS", "FAIR_PHASES", "GATE_FORMS", "EXPORT_TARGETS",
           "MIN_LIMIT", "DEFAULT_ARCH", "REPLACEMENTS"]

DEFAULT_ARCH = "resnet8"
GRANULARITIES = ("pixel", "channel", "layer")
SEARCH_METHODS = ("snl", "layer-drop")
FAIR_METHODS = ("ceag", "el", "nft")
FAIR_PHASES = ("finetune", "search", "both")
GATE_FORMS = ("pi", "sparse", "mask")
#: pi: OUT/model.onnx (PI-ready), edge: OUT/model.edge.onnx (plaintext-optimal), both (relucomp.export_targets)
EXPORT_TARGETS = ("pi", "edge", "both")
IMPORTANCES = ("l1", "l2", "bn", "taylor")
REPLACEMENTS = ("affine", "identity")
DP_PHASES = ("finetune", "search", "both")   # which phases run under DP-SGD (one accountant, one ε)
DP_ACCOUNTANTS = ("rdp", "prv")
EXPORT_WEIGHTS = ("last", "ema")
AUGMIX_OP_SETS = ("augmix", "prime", "augmix+prime")   # robustness.augmix_ops (relucomp.robust_train.OP_SETS)
#: fewest images that still give every split (train / val / test) samples of every class
MIN_LIMIT = 100


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSection(_Section):
    spec: str = "synthetic"
    target: str | None = None
    fair_groups: str | None = None
    limit: int | None = None
    image_size: int = 32
    num_classes: int | None = None
    cache_dir: str | None = None


class ModelSection(_Section):
    spec: str | None = None             # None: the default architecture (resnet8) trained on the data
    checkpoint: str | None = None
    pretrained: bool = False            # trust a file.py:factory model's own weights (no pretraining)
    pretrain_epochs: int | None = None  # None: 0 for a trained model (or the embedded default weights), else the effort's
    pretrain_lr: float = 0.05
    leaf_modules: list[str] = []        # "package.module:ClassName" kept opaque by the tracer


class SearchSection(_Section):
    relu_budget: Union[int, str, None] = None
    granularity: str = "pixel"
    method: str = "snl"
    epochs: int | None = None           # None: from runtime.effort (resolved before the run)
    lr: float = 0.01                    # weights' SGD LR in the search (see relucomp.recipe.SEARCH_DEFAULTS)
    alpha_lr: float = 0.02
    kd_weight: float = 0.5
    kd_temperature: float = 4.0         # the KD temperature of the search (and of the finetune unless it sets one)
    replace_maxpool: bool = False
    budget_includes_maxpool: bool = False  # MaxPool comparisons count against relu_budget (search and export)
    replacement: str = "affine"         # linearized ReLUs become: affine (learned per-channel s·x+b) | identity (SNL)
    warmup: float = 0.15                # fraction of the search steps before the first pin
    hysteresis: float = 0.05            # a pinned entry re-opens when its score beats a live one by this margin
    refine: int = 3                     # rounds of discrete kept/linear swaps after binarization (0: off)
    clip_grad_norm: float | None = 5.0  # cap on the weights' gradient L2 norm per step (None: off)


class FinetuneSection(_Section):
    epochs: int | None = None           # None: from runtime.effort (resolved before the run)
    lr: float | None = None             # None: the recipe's, 0.01 × batch / 64 (relucomp.recipe.finetune_lr);
                                        # under DP 0.1 × B / 512 / C (per unit of clipping norm, recipe.dp_finetune_lr)
    kd_weight: float = 0.7              # (1 - w)·CE + w·KD(teacher)
    temperature: float | None = None    # None: search.kd_temperature (resolved before the run)
    bn_recalibrate: bool = True         # re-estimate BatchNorm statistics once the weights are final
    ema: bool = True
    ema_decay: float = 0.99
    ema_warmup: bool | None = None      # decay min(ema_decay, (1+t)/(10+t)) (De et al.); None: on under DP only
    clip_grad_norm: float | None = 5.0  # cap on the gradient L2 norm per step (None: off)


class FairnessSection(_Section):
    method: str | None = None           # None: ceag with data.fair_groups, else nft
    tolerance: float = 2.0
    phase: str = "finetune"
    dual_lr: float = 0.05
    heldout_dual_lr: float = 0.2        # CEAG under DP: step of the duals read from the validation split (4 per epoch)


class RobustnessSection(_Section):
    eval: bool = False                  # CA / NPA / AdvA of dense and compiled (stage robustness; relucomp.robustness)
    robust: bool = False                # robust compile (RLNet: adversarial teacher, 3-way KD, dual BN; implies eval)
    corruptions: Union[list[str], str] = "all"  # "all" (the 15 CIFAR-10-C ones), families or names
    severities: Union[list[int], str] = [1, 2, 3, 4, 5]  # or "1,3,5"
    samples: int | None = 1000          # seeded test subset evaluated (None: the whole test split)
    split: str = "test"                 # the split evaluated: test (what you report) | val (what you tune on)
    pgd_epsilon: Union[float, str] = "8/255"  # L-inf radius in pixel units [0, 1]
    pgd_step: Union[float, str] = "2/255"
    pgd_steps: int = 10
    # the robust compile (relucomp.robust_train; only with robust = true)
    teacher_robust: bool = False        # the given model is already robust: no adversarial finetune of the teacher
    teacher_epochs: int | None = None   # adversarial finetune of the dense teacher; None: the effort's
    teacher_lr: float | None = None     # its peak learning rate (cosine to 0); None: 0.2 × model.pretrain_lr
    train_attack: str = "trades"        # the teacher's objective: trades | pgd
    train_attack_steps: int | None = None  # PGD steps when training (None: the effort's; 2 on quick)
    train_epsilon: Union[float, str] = "8/255"
    trades_beta: float = 2.5            # HAT's CIFAR-10 setting with helper_weight 0.5 (TRADES's 6 before session 18)
    helper_weight: float = 0.5          # HAT's helper term in the teacher's step (Rade & Moosavi-Dezfooli 2022):
                                        # weight γ of CE on x + 2·(x_adv − x), labelled by the dense model's
                                        # prediction on x_adv; 0: off (the default before session 18)
    adv_teacher: bool = True            # a second robust teacher for the student's adversarial KD term (MTARD's
                                        # split of the teachers): TRADES at adv_teacher_beta, no helper term, else
                                        # trained as the robust teacher; false: one teacher for all three terms
    adv_teacher_beta: float = 6.0
    adv_teacher_lr: float | None = None  # the second teacher's peak learning rate; None: teacher_lr's
    adv_teacher_from: str | None = None  # a robust model of the same task (built-in name or file.py:factory, its
                                        # weights in adv_teacher_from_checkpoint) the second teacher is distilled
                                        # from: TRADES's robust term targets that model's clean output instead of
                                        # the teacher's own (e.g. a wider robust model); None: plain TRADES
    adv_teacher_from_checkpoint: str | None = None
    student_init: Union[str, float] = "adversarial"  # the weights the student starts from: adversarial (the
                                        # adversarial KD term's teacher; with one teacher the robust teacher) |
                                        # robust (the robust teacher's, the clean and natural terms' teacher) | a
                                        # number w in (0, 1): the weight average (1 − w)·robust + w·adversarial |
                                        # "T:prefix" (T adversarial or robust): layer-wise — T's parameters before
                                        # the first one named prefix…, the other teacher's from there on
    augmix: bool = True                 # AugMix views (natural-perturbation term) + JSD for the teacher
    augmix_ops: str = "prime"           # the op set AugMix's chains draw from: prime (PRIME's primitives: random
                                        # filters, colour curves, smooth deformations; measured better, README) |
                                        # augmix (AugMix's own, the default before session 16) | augmix+prime
    student_augmix_ops: str | None = None  # the student's AugMix views' op set; None: augmix_ops (the teacher's)
    jsd_weight: float = 48.0            # AugMix's 12, ×4: measured on this project's subsets (README, robust.json)
    kd_clean: float = 1.0               # weights of the three KD terms (student vs robust teacher)
    kd_natural: float = 1.0
    kd_adv: float = 1.0
    student_jsd: float = 0.0            # AugMix's JSD consistency in the student's step too (two views; 0: off)
    dual_bn: bool = True                # separate BN for clean / perturbed batches while training
    export_branch: str = "clean"        # the DualBN branch folded into the exported model: clean | perturbed
    natural_branch: str = "perturbed"   # the DualBN branch the AugMix (natural-perturbation) views train on
    clean_teacher: str = "dual"         # the clean KD term's teacher: dual (the teacher trained with dual BN,
                                        # AdvProp: its clean branch; without the teacher's adversarial finetune,
                                        # the given teacher) | robust (RLNet: the robust teacher) | dense (MTARD:
                                        # the model before the adversarial finetune); the other two terms keep the
                                        # robust teacher
    compare_branches: bool = False      # also evaluate the other branch folded (model "compiled_<branch>_bn")
    search_objective: str = "robust"    # the mask search's loss: robust (three-way KD, as the finetune) | clean
                                        # (its clean KD term only; the finetune stays three-way)

    @field_validator("student_init", mode="before")
    @classmethod
    def _name_or_weight(cls, v: Any) -> Any:
        """Text from the CLI or a config override: a number becomes a float (a weight average), a name stays
        (unknown names are left for :func:`check_robust_compile` to name)."""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        return v


class DPSection(_Section):
    epsilon: float | None = None        # None: no differential privacy; inf: DP-SGD machinery without noise
    delta: float | None = None          # None: min(1e-5, 0.1/n) for n training images; must be < 1/n
    max_grad_norm: Union[float, str, None] = None  # None: 1.0 (per-sample clipping norm C); "auto": the 80th
                                        # percentile of the validation split's per-sample gradient norms at the start
    phase: str = "finetune"             # which phases run under DP-SGD: finetune | search | both (one ε for all)
    batch_size: int | None = None       # expected Poisson batch; None: max(runtime.batch_size, 256)
    accountant: str = "rdp"             # rdp | prv (opacus accountants)
    augmult: int = 1                    # augmentation multiplicity (De et al.): each sampled image's gradient is the
                                        # mean over this many random crops/flips of it, clipped once (same privacy)

    @field_validator("max_grad_norm", mode="before")
    @classmethod
    def _number_or_auto(cls, v: Any) -> Any:
        """Text from the CLI or a config override: a number becomes a float, any spelling of auto "auto"
        (other text is left for :func:`check_dp` to name)."""
        if not isinstance(v, str):
            return v
        if v.strip().lower() == "auto":
            return "auto"
        try:
            return float(v)
        except ValueError:
            return v


class PruningSection(_Section):
    prune_channels: float | None = None
    mac_budget: Union[int, str, None] = None
    sparsity: float | None = None
    importance: str = "l1"


class ExportSection(_Section):
    enabled: bool = True
    gate_form: str = "pi"
    target: str = "pi"                  # pi | edge | both: which ONNX files the export stage writes
    opset: int = 18
    weights: str | None = None          # last | ema; None: ema under DP, else last


class RuntimeSection(_Section):
    seed: int = 0
    effort: str | None = None           # quick (None) | standard | paper: the schedule of unset epochs / batch size
    batch_size: int | None = None       # None: from runtime.effort (resolved before the run)
    device: str = "cpu"
    out_dir: str | None = None
    resume: bool = False
    progress: bool = True
    diagnose: bool = False
    nproc: int = 1                      # processes (torch.distributed, DDP); > 1: relucomp compile starts torchrun
    amp: str = "none"                   # mixed precision: none | bf16 | fp16 (fp16: CUDA only)
    workers: int = 0                    # DataLoader worker processes for training (0: the in-memory loader)
    pin_memory: bool | None = None      # pinned host memory for batches (None: on with --device cuda)
    cudnn_benchmark: bool = True        # torch.backends.cudnn.benchmark on --device cuda (False: reproducible)


class CompileConfig(_Section):
    """Everything a compile run depends on (hooks such as callbacks and Python objects excluded)."""

    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    search: SearchSection = SearchSection()
    finetune: FinetuneSection = FinetuneSection()
    fairness: FairnessSection = FairnessSection()
    robustness: RobustnessSection = RobustnessSection()
    dp: DPSection = DPSection()
    pruning: PruningSection = PruningSection()
    export: ExportSection = ExportSection()
    runtime: RuntimeSection = RuntimeSection()

    def get(self, dotted: str) -> Any:
        sec, field = dotted.split(".")
        return getattr(getattr(self, sec), field)

    def with_values(self, values: dict[str, Any]) -> "CompileConfig":
        """A copy with ``{"section.field": value}`` applied (validated types)."""
        data = self.model_dump()
        for dotted, v in values.items():
            sec, field = split_key(dotted)
            data[sec][field] = v
        return _build(data, "override")

    @property
    def fair_method(self) -> str:
        """The fairness method: explicit, else ceag with groups (nft under DP, where ceag is opt-in)."""
        auto = "ceag" if self.data.fair_groups and self.dp.epsilon is None else "nft"
        return (self.fairness.method or auto).lower()

    @property
    def export_weights(self) -> str:
        """The weights exported (``last`` / ``ema``): explicit, else ``ema`` under DP, else ``last``."""
        return self.export.weights or ("ema" if self.dp.epsilon is not None else "last")

    @property
    def wants_fairness(self) -> bool:
        """Fairness asked for (groups or a method given): the fairness section (and its EMA variant) are computed."""
        return self.data.fair_groups is not None or self.fairness.method is not None

    def to_toml(self) -> str:
        return to_toml(self)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def split_key(dotted: str) -> tuple[str, str]:
    """``"section.field"`` → ``(section, field)``; an unknown key is a :class:`ConfigError`."""
    sec, _, field = dotted.partition(".")
    sections = CompileConfig.model_fields
    if sec in sections and field in sections[sec].annotation.model_fields:
        return sec, field
    known = [f"{s}.{f}" for s in sections for f in sections[s].annotation.model_fields]
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
    raise ConfigError(f"unknown config option {dotted!r}",
                      (f"did you mean {close[0]!r}? " if close else "")
                      + f"use one of the sections {', '.join(sections)} and their fields "
                      "(relucomp compile --print-config shows them all)")


def field_keys(field: str) -> list[str]:
    """Every ``"section.field"`` whose field is named ``field`` (``"search_objective"`` →
    ``["robustness.search_objective"]``)."""
    sections = CompileConfig.model_fields
    return [f"{s}.{field}" for s in sections if field in sections[s].annotation.model_fields]


def is_flag(dotted: str) -> bool:
    """Whether the config field ``"section.field"`` is a plain on/off switch (``bool``)."""
    sec, field = split_key(dotted)
    ann = CompileConfig.model_fields[sec].annotation.model_fields[field].annotation
    return bool in (ann, *typing.get_args(ann))


def _build(data: dict[str, Any], where: str) -> CompileConfig:
    try:
        return CompileConfig.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            raise ConfigError(f"unknown config option {loc!r} in {where}",
                              "check the spelling (relucomp compile --print-config lists every option)") from None
        raise ConfigError(f"config option {loc} = {e.get('input')!r} in {where}: {e['msg']}",
                          "give a value of the right type (relucomp compile --print-config shows the defaults)") from None


def _path_str(v: Any) -> Any:
    return os.fspath(v) if isinstance(v, os.PathLike) else v


def load_config(config: "CompileConfig | dict | str | os.PathLike | None") -> CompileConfig:
    """A CompileConfig from an instance, a nested dict or a TOML file path (``None``: defaults)."""
    if config is None:
        return CompileConfig()
    if isinstance(config, CompileConfig):
        return config
    if isinstance(config, dict):
        return _build(config, "the config dict")
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", "check the --config path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc})", "fix the file, e.g. key = \"value\"") from None
    data.pop("relucomp", None)  # provenance header written by to_toml
    return _build(data, str(path))


def resolve_config(config=None, overrides: dict[str, Any] | None = None) -> CompileConfig:
    """Load ``config``, apply overrides (keyword names of :data:`KEYWORDS` or ``"section.field"``), resolve the effort."""
    cfg = load_config(config)
    values: dict[str, Any] = {}
    for k, v in (overrides or {}).items():
        dotted = KEYWORDS.get(k, k)
        if "." not in dotted:
            raise ConfigError(f"unknown option {k!r}", f"use one of {', '.join(sorted(KEYWORDS))}")
        values[dotted] = _path_str(v)
    return resolve_effort(cfg.with_values(values) if values else cfg)


def resolve_effort(cfg: CompileConfig) -> CompileConfig:
    """Fill the unset schedule (search / finetune epochs, batch size) from ``runtime.effort`` and name the effort.

    ``model.pretrain_epochs`` stays ``None`` ("automatic": the effort's number
    for an untrained model, 0 for a trained one or the embedded default
    weights), since whether the model is trained is known only once it is
    built.  The finetune's KD temperature defaults to the search's.  Explicit
    values always win; resolving twice changes nothing, so ``OUT/config.toml``
    replays the same schedule.
    """
    from .recipe import DEFAULT_EFFORT, EFFORTS, PRESETS

    name = (cfg.runtime.effort or DEFAULT_EFFORT).lower()
    _one_of(name, EFFORTS, "--effort", "effort")
    p, values = PRESETS[name], {}
    for dotted, v in (("runtime.effort", name), ("search.epochs", p.search_epochs),
                      ("finetune.epochs", p.finetune_epochs), ("runtime.batch_size", p.batch_size),
                      ("finetune.temperature", cfg.search.kd_temperature)):
        if cfg.get(dotted) is None or dotted == "runtime.effort" and cfg.get(dotted) != name:
            values[dotted] = v
    return cfg.with_values(values) if values else cfg


def preset_pretrain_epochs(cfg: CompileConfig) -> int:
    """Pretraining epochs of an untrained model under ``runtime.effort``."""
    from .recipe import DEFAULT_EFFORT, PRESETS

    return PRESETS[(cfg.runtime.effort or DEFAULT_EFFORT).lower()].pretrain_epochs


# --------------------------------------------------------------------------- validation

def _one_of(value: Any, allowed: tuple, flag: str, what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}", f"use {flag} {' | '.join(allowed)}")


def _check_device(device: str) -> None:
    kind = device.split(":")[0].strip().lower()
    if kind == "cpu":
        return
    if kind not in ("cuda", "mps"):
        raise ConfigError(f"unknown device {device!r}", "use --device cpu (or cuda on a machine with a CUDA GPU)")
    import torch

    ok = torch.cuda.is_available() if kind == "cuda" else torch.backends.mps.is_available()
    if not ok:
        raise ConfigError(f"--device {device}: this torch ({torch.__version__}) has no usable {kind.upper()} device",
                          "use --device cpu, or install a CUDA build of torch on a machine with a GPU")


def _check_recipe(cfg: CompileConfig) -> None:
    """The search / finetune recipe's ranges (relucomp.recipe documents the recipe)."""
    s, t = cfg.search, cfg.finetune
    for name, v, ok, rule, example in (
            ("search.warmup", s.warmup, 0 <= s.warmup < 1, "in [0, 1)", "0.15"),
            ("search.hysteresis", s.hysteresis, s.hysteresis >= 0, "≥ 0", "0.05"),
            ("search.refine", s.refine, s.refine >= 0, "≥ 0 (rounds)", "3"),
            ("search.kd_weight", s.kd_weight, 0 <= s.kd_weight <= 1, "in [0, 1]", "0.5"),
            ("search.kd_temperature", s.kd_temperature, s.kd_temperature > 0, "> 0", "4.0"),
            ("finetune.kd_weight", t.kd_weight, 0 <= t.kd_weight <= 1, "in [0, 1]", "0.7"),
            ("finetune.temperature", t.temperature, t.temperature is None or t.temperature > 0, "> 0", "4.0"),
            ("search.clip_grad_norm", s.clip_grad_norm, s.clip_grad_norm is None or s.clip_grad_norm > 0,
             "> 0 (or unset: no clipping)", "5.0"),
            ("finetune.clip_grad_norm", t.clip_grad_norm, t.clip_grad_norm is None or t.clip_grad_norm > 0,
             "> 0 (or unset: no clipping)", "5.0")):
        if not ok or (isinstance(v, float) and not math.isfinite(v)):
            raise ConfigError(f"{name} = {v} must be {rule}", f"give e.g. {name} = {example} (in the config file "
                                                              "or as a keyword of relucomp.compile)")


def _check_data(cfg: CompileConfig) -> None:
    from .data.load import parse_data_spec

    kind, path = parse_data_spec(cfg.data.spec)
    if path is not None and not path.exists():
        raise DataError(f"data path {path} does not exist", f"check the path in --data {cfg.data.spec}")


def check_dp(cfg: CompileConfig, n_train: int | None = None) -> float | None:
    """The differential-privacy rules; returns δ (resolved when ``n_train`` is known) or ``None`` when DP is off.

    ε > 0 (``inf``: clipping without noise, no guarantee); 0 < δ < 1/n for n
    training images (checked once n is known, still before training; default
    ``min(1e-5, 0.1/n)``); clipping norm > 0; phase ``search``/``both`` need the SNL search; no
    CEAG/EL constraints (their dual updates read the private training data);
    no GMP sparsity.
    """
    dp, ew = cfg.dp, cfg.export.weights
    if ew is not None:
        _one_of(ew, EXPORT_WEIGHTS, "--export-weights", "export weights")
    _one_of(dp.phase, DP_PHASES, "--dp-phase", "DP phase")
    _one_of(dp.accountant, DP_ACCOUNTANTS, "dp.accountant =", "DP accountant")
    if not 0.0 < cfg.finetune.ema_decay < 1.0:
        raise ConfigError(f"finetune.ema_decay {cfg.finetune.ema_decay} must lie in (0, 1)", "use e.g. 0.99")
    eps = dp.epsilon
    if eps is None:
        stray = [f"--dp-{k.replace('_', '-')}" for k in ("delta", "max_grad_norm", "batch_size") if getattr(dp, k) is not None]
        stray += ["--dp-augmult"] if dp.augmult != 1 else []
        if stray or dp.phase != "finetune":
            flag = stray[0] if stray else "--dp-phase"
            raise ConfigError(f"{flag} is set but --dp-epsilon is not (differential privacy is off)",
                              f"add --dp-epsilon (e.g. 8) to finetune under DP-SGD, or drop {flag}")
        return None
    if not eps > 0:  # also NaN
        raise ConfigError(f"--dp-epsilon {eps} must be > 0",
                          "give a positive ε, e.g. --dp-epsilon 8 (smaller = more private; inf = no noise)")
    if isinstance(dp.max_grad_norm, str) and dp.max_grad_norm != "auto":
        raise ConfigError(f"--dp-max-grad-norm {dp.max_grad_norm!r} is neither a number nor 'auto'",
                          "give a clipping norm such as 1.0, or auto (placed from the validation split)")
    if dp.max_grad_norm == "auto":
        if dp.phase != "finetune":
            raise ConfigError(f"--dp-max-grad-norm auto with --dp-phase {dp.phase}: auto places C at the DP "
                              "finetune's start, after the mask search", "give a number, e.g. --dp-max-grad-norm 1.0")
    elif dp.max_grad_norm is not None and not (dp.max_grad_norm > 0 and math.isfinite(dp.max_grad_norm)):
        raise ConfigError(f"--dp-max-grad-norm {dp.max_grad_norm} must be > 0", "give a clipping norm such as 1.0")
    if not isinstance(dp.augmult, int) or isinstance(dp.augmult, bool) or not 1 <= dp.augmult <= 64:
        raise ConfigError(f"--dp-augmult {dp.augmult} must be a whole number from 1 to 64",
                          "give e.g. --dp-augmult 4 (augmentations averaged per sampled image; 1 = off)")
    if dp.batch_size is not None and dp.batch_size < 1:
        raise ConfigError(f"--dp-batch-size {dp.batch_size} must be ≥ 1", "give e.g. --dp-batch-size 256")
    if dp.phase != "finetune" and cfg.search.method != "snl":
        raise ConfigError(f"--dp-phase {dp.phase} runs the SNL mask search under DP-SGD, but --search is "
                          f"{cfg.search.method} (it scores layers on the data without DP)",
                          "use --search snl with --dp-phase search|both, or --dp-phase finetune")
    if cfg.fair_method == "el":
        raise ConfigError("--fair-method el with --dp-epsilon: its constraint reads per-group losses of the private "
                          "training batches every step, which DP-SGD does not account for",
                          "use --fair-method ceag (under DP its duals read the validation split) or nft with "
                          "--dp-epsilon, or drop --dp-epsilon")
    if cfg.fair_method == "ceag" and cfg.fairness.phase != "finetune":
        raise ConfigError(f"--fair-method ceag with --dp-epsilon and --fair-phase {cfg.fairness.phase}: under DP "
                          "CEAG runs in the finetune only (duals on the validation split, weighted clipped gradients)",
                          "use --fair-phase finetune with --dp-epsilon")
    if cfg.pruning.sparsity is not None:
        raise ConfigError("--sparsity (GMP) with --dp-epsilon is not supported",
                          "drop --sparsity, or use --prune-channels (structured pruning runs before the DP finetune)")
    delta = dp.delta
    if delta is not None and not 0.0 < delta < 1.0:
        raise ConfigError(f"--dp-delta {delta:g} must lie in (0, 1/n) for n training images",
                          "give a small δ, e.g. --dp-delta 1e-5")
    if n_train is None:
        return delta
    if n_train <= 0:
        raise ConfigError("the training split is empty: DP-SGD needs training images", "use a larger data set or --limit")
    if delta is None:
        return min(1e-5, 0.1 / n_train)
    if not delta < 1.0 / n_train:
        raise ConfigError(f"--dp-delta {delta:g} must lie in (0, 1/n) = (0, {1.0 / n_train:.3g}) for n = {n_train} "
                          "training images (δ ≥ 1/n allows leaking a whole record)",
                          f"give a smaller δ, e.g. --dp-delta {min(1e-5, 0.1 / n_train):.1g}")
    return delta


def validate(cfg: CompileConfig, *, warm_start: bool = False, check_data: bool = True) -> CompileConfig:
    """Check every option that can be checked without decoding data or building the model.

    Raises :class:`~relucomp.errors.ConfigError` (or ``BudgetError`` /
    ``DataError``) with the cause and the fix.  Checks that need the traced
    model (a budget above the model's ReLUs, a ``%`` budget, pruning targets)
    run right after tracing, still before any training; target and group
    columns are checked by :func:`relucomp.data.load_data` from the data set's
    metadata (file names, CSV) before any image is decoded.
    """
    from .budget import check_relu_budget, parse_count

    cfg = resolve_effort(cfg)
    s, f, d, r = cfg.search, cfg.fairness, cfg.data, cfg.runtime
    _one_of(s.granularity, GRANULARITIES, "--granularity", "granularity")
    _one_of(s.replacement, REPLACEMENTS, "--replacement", "replacement")
    _check_recipe(cfg)
    _one_of(s.method, SEARCH_METHODS, "--search", "search method")
    if f.method is not None:
        _one_of(f.method.lower(), FAIR_METHODS, "--fair-method", "fairness method")
    _one_of(f.phase, FAIR_PHASES, "--fair-phase", "fairness phase")
    _one_of(cfg.export.gate_form, GATE_FORMS, "gate_form =", "gate form")
    _one_of(cfg.export.target, EXPORT_TARGETS, "--export-target", "export target")
    _one_of(cfg.pruning.importance, IMPORTANCES, "--prune-importance", "pruning importance")
    if f.tolerance < 0 or not math.isfinite(f.tolerance):
        raise ConfigError(f"tolerance {f.tolerance} must be ≥ 0 (accuracy points)", "give e.g. --tolerance 2")
    if not (f.heldout_dual_lr > 0 and math.isfinite(f.heldout_dual_lr)):
        raise ConfigError(f"fairness.heldout_dual_lr {f.heldout_dual_lr} must be > 0", "use e.g. 0.2")
    if s.relu_budget is None:
        raise ConfigError("no ReLU budget given", "pass --relu-budget 15k (or set search.relu_budget in the config file)")
    if not (isinstance(s.relu_budget, str) and s.relu_budget.strip().endswith("%")):
        early = parse_count(s.relu_budget)
        if early <= 0:
            check_relu_budget(early, 1)
    for name, v, lo in (("--epochs", s.epochs, 0), ("--finetune-epochs", cfg.finetune.epochs, 0),
                        ("--pretrain-epochs", cfg.model.pretrain_epochs, 0), ("--batch-size", r.batch_size, 1),
                        ("--image-size", d.image_size, 4), ("--seed", cfg.runtime.seed, 0)):
        if v is not None and v < lo:
            raise ConfigError(f"{name} {v} must be ≥ {lo}", f"give {name} {max(lo, 1)} or more"
                              if lo else f"give {name} 0 or more (numpy seeds are non-negative)")
    if warm_start and cfg.dp.epsilon is not None and cfg.dp.phase != "finetune":
        raise ConfigError(f"--dp-phase {cfg.dp.phase} with a warm-started search (budget sweep): the shared search "
                          "state was not searched under DP-SGD", "use --dp-phase finetune in sweeps, or compile "
                          "each budget separately")
    if s.method == "snl" and s.epochs == 0 and not warm_start:
        raise ConfigError("--epochs 0 with --search snl trains no ReLU masks (the result would be arbitrary)",
                          "give --epochs 1 or more, or use --search layer-drop (no training)")
    for name, v in (("--lr", s.lr), ("alpha_lr", s.alpha_lr), ("finetune lr", cfg.finetune.lr)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{name} {v} must be a positive number", f"give e.g. {name} 0.01")
    if d.limit is not None and d.limit < MIN_LIMIT:
        raise ConfigError(f"--limit {d.limit} is too small to split into train / val / test with every class",
                          f"use --limit {MIN_LIMIT} or more (e.g. --limit 300 for a quick run), or drop --limit")
    p = cfg.pruning
    if p.prune_channels is not None and p.mac_budget is not None:
        raise ConfigError("give one of --prune-channels and --mac-budget, not both", "e.g. --prune-channels 0.5 or --mac-budget 200M")
    if p.prune_channels is not None and not 0.0 <= p.prune_channels < 1.0:
        raise ConfigError(f"--prune-channels {p.prune_channels} must be in [0, 1)", "give e.g. --prune-channels 0.5")
    if p.sparsity is not None and not 0.0 < p.sparsity < 1.0:
        raise ConfigError(f"--sparsity {p.sparsity} must be in (0, 1)", "give e.g. --sparsity 0.9")
    check_dp(cfg)
    check_robustness(cfg)
    _check_device(r.device)
    check_runtime(cfg)
    if check_data:
        _check_data(cfg)
        if cfg.robustness.eval or cfg.robustness.robust:
            _check_rgb(cfg)
    return cfg


AMP_KINDS = ("none", "bf16", "fp16")


def process_count(cfg: CompileConfig) -> int:
    """Processes the run will train on: torchrun's ``WORLD_SIZE`` when launched by it, else ``runtime.nproc``."""
    from .distributed import torchrun_env

    env = torchrun_env()
    return int(env["WORLD_SIZE"]) if env is not None else cfg.runtime.nproc


def check_runtime(cfg: CompileConfig) -> None:
    """``runtime.nproc`` / ``amp`` / ``workers``, the torchrun variables and the batch split, before any work."""
    from .distributed import check_batch, torchrun_env

    r = cfg.runtime
    _one_of((r.amp or "none").lower(), AMP_KINDS, "--amp", "mixed precision")
    if r.amp.lower() == "fp16" and not r.device.startswith("cuda"):
        raise ConfigError(f"--amp fp16 on --device {r.device}: float16 autocast with a gradient scaler is for CUDA",
                          "use --amp bf16 on the CPU (or --amp none), or --device cuda")
    if r.nproc < 1:
        raise ConfigError(f"--nproc {r.nproc} must be ≥ 1", "give --nproc 2 (processes on this machine) or drop it")
    if r.workers < 0:
        raise ConfigError(f"--workers {r.workers} must be ≥ 0", "give --workers 0 (in-memory loader) or e.g. 4")
    env = torchrun_env()  # half-set variables: a one-line error here
    world = process_count(cfg)
    if env is not None and r.nproc > 1 and world != r.nproc:
        raise ConfigError(f"--nproc {r.nproc} but torchrun started {world} processes",
                          f"drop --nproc under torchrun (or give --nproc {world})")
    if world > 1:
        check_batch(r.batch_size, world)
        if cfg.dp.epsilon is not None:
            raise ConfigError(f"--dp-epsilon with {world} processes: the DP-SGD finetune (opacus) runs on one process",
                              "drop --nproc / torchrun for DP runs")
        if cfg.search.method == "layer-drop":
            raise ConfigError("--search layer-drop with more than one process (it does not train: nothing to scale)",
                              "drop --nproc / torchrun, or use --search snl")
        if cfg.robustness.robust:
            raise ConfigError(f"--robust with {world} processes: the robust teacher, dual BN and three-way "
                              "distillation run on one process", "drop --nproc / torchrun for --robust runs")


def robustness_settings(cfg: CompileConfig):
    """The validated :class:`relucomp.robustness.RobustnessSettings` of ``cfg`` (ConfigError with the fix)."""
    from .robustness import RobustnessSettings

    rb = cfg.robustness
    return RobustnessSettings.make(corruptions=rb.corruptions, severities=rb.severities, samples=rb.samples,
                                   pgd_epsilon=rb.pgd_epsilon, pgd_step=rb.pgd_step, pgd_steps=rb.pgd_steps,
                                   seed=cfg.runtime.seed)


ROBUST_TRAIN_FIELDS = ("teacher_robust", "teacher_epochs", "teacher_lr", "train_attack", "train_attack_steps",
                       "train_epsilon", "trades_beta", "helper_weight", "adv_teacher", "adv_teacher_beta",
                       "adv_teacher_lr", "adv_teacher_from", "adv_teacher_from_checkpoint", "student_init", "augmix",
                       "augmix_ops", "student_augmix_ops", "jsd_weight",
                       "kd_clean", "kd_natural", "kd_adv", "student_jsd", "dual_bn", "export_branch",
                       "compare_branches", "natural_branch", "clean_teacher", "search_objective")


def layer_cut(names: list[str], prefix: str) -> int | None:
    """The index of the first of ``names`` (state-dict order) that starts with ``prefix``; None if none does —
    where a layer-wise ``student_init`` switches from one teacher's tensors to the other's."""
    return next((i for i, k in enumerate(names) if k.startswith(prefix)), None)


def check_student_init_layers(cfg: CompileConfig, names: list[str]) -> None:
    """A layer-wise ``robustness.student_init`` ("T:prefix") must name a parameter prefix of the student past its
    first tensor (``names``: the model's state-dict names, in order) — checked by the model stage, before any
    training."""
    init = cfg.robustness.student_init
    if not (cfg.robustness.robust and isinstance(init, str) and ":" in init):
        return
    prefix = init.partition(":")[2]
    cut = layer_cut(names, prefix)
    if not cut:
        blocks = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in names if "." in k))[1:13]   # module names
        raise ConfigError(f"robustness.student_init {init!r}: {prefix!r} "
                          + ("is the student's first layer (nothing comes before it)" if cut == 0 else
                             "names no parameter of the student"),
                          f"give a later layer's name prefix, e.g. one of {', '.join(blocks) or names[-1]}")


def check_robust_compile(cfg: CompileConfig) -> None:
    """The robust compile's options (``robustness.robust`` / ``--robust``) and the combinations it refuses."""
    rb, default = cfg.robustness, RobustnessSection()
    if not rb.robust:
        stray = [f for f in ROBUST_TRAIN_FIELDS if getattr(rb, f) != getattr(default, f)]
        if stray:
            raise ConfigError(f"robustness.{stray[0]} is set but --robust is not (it configures the robust compile)",
                              f"add --robust, or drop robustness.{stray[0]}")
        return
    from .robustness import parse_epsilon

    _one_of(rb.train_attack, ("trades", "pgd"), "--train-attack", "training attack")
    _one_of(rb.export_branch, ("clean", "perturbed"), "--export-branch", "exported BatchNorm branch")
    _one_of(rb.natural_branch, ("clean", "perturbed"), "robustness.natural_branch =", "BatchNorm branch of the AugMix views")
    _one_of(rb.clean_teacher, ("dual", "robust", "dense"), "robustness.clean_teacher =",
            "teacher of the clean KD term")
    _one_of(rb.search_objective, ("robust", "clean"), "robustness.search_objective =", "mask-search objective")
    for field in ("augmix_ops", "student_augmix_ops"):
        if getattr(rb, field) is not None:
            _one_of(getattr(rb, field), AUGMIX_OP_SETS, f"robustness.{field} =", "AugMix op set")
    parse_epsilon(rb.train_epsilon, "--train-epsilon")
    for name, v, ok, fix in (
            ("--train-attack-steps", rb.train_attack_steps, rb.train_attack_steps is None or rb.train_attack_steps >= 1,
             "give --train-attack-steps 2 (or more)"),
            ("--robust-teacher-epochs", rb.teacher_epochs, rb.teacher_epochs is None or rb.teacher_epochs >= 0,
             "give --robust-teacher-epochs 2 (0: keep the dense teacher as it is)"),
            ("robustness.teacher_lr", rb.teacher_lr,
             rb.teacher_lr is None or (rb.teacher_lr > 0 and math.isfinite(rb.teacher_lr)),
             "give e.g. robustness.teacher_lr = 0.01, or drop it (0.2 × the pretraining learning rate)"),
            ("--trades-beta", rb.trades_beta, rb.trades_beta >= 0 and math.isfinite(rb.trades_beta), "give e.g. --trades-beta 6"),
            ("robustness.helper_weight", rb.helper_weight, rb.helper_weight >= 0 and math.isfinite(rb.helper_weight),
             "give e.g. robustness.helper_weight = 0.5 (0: off)"),
            ("robustness.adv_teacher_beta", rb.adv_teacher_beta,
             rb.adv_teacher_beta >= 0 and math.isfinite(rb.adv_teacher_beta),
             "give e.g. robustness.adv_teacher_beta = 6 (TRADES β of the adversarial term's teacher)"),
            ("robustness.adv_teacher_lr", rb.adv_teacher_lr,
             rb.adv_teacher_lr is None or (rb.adv_teacher_lr > 0 and math.isfinite(rb.adv_teacher_lr)),
             "give e.g. robustness.adv_teacher_lr = 0.01, or drop it (the robust teacher's)"),
            ("robustness.jsd_weight", rb.jsd_weight, rb.jsd_weight >= 0 and math.isfinite(rb.jsd_weight),
             "give e.g. robustness.jsd_weight = 48"),
            ("robustness.student_jsd", rb.student_jsd, rb.student_jsd >= 0 and math.isfinite(rb.student_jsd),
             "give e.g. robustness.student_jsd = 12 (0: off)")):
        if not ok:
            raise ConfigError(f"{name} {v} is out of range", fix)
    kds = (rb.kd_clean, rb.kd_natural, rb.kd_adv)
    if any(not (k >= 0 and math.isfinite(k)) for k in kds) or sum(kds) <= 0:
        raise ConfigError(f"the three-way KD weights (clean, natural, adversarial) = {kds} must be ≥ 0, not all 0",
                          "give e.g. kd_clean = kd_natural = kd_adv = 1 in [robustness] (or as keywords)")
    if (rb.augmix_ops != default.augmix_ops or rb.student_augmix_ops is not None) and not rb.augmix:
        field = "augmix_ops" if rb.augmix_ops != default.augmix_ops else "student_augmix_ops"
        raise ConfigError(f"robustness.{field} is set but robustness.augmix is off (it picks the ops of the AugMix "
                          "views)", f"drop robustness.{field}, or turn robustness.augmix back on")
    no_finetune = rb.teacher_robust or rb.teacher_epochs == 0
    for field, what in (("helper_weight", "HAT's helper term is part of it"),
                        ("teacher_lr", "it is the finetune's learning rate"),
                        ("adv_teacher_beta", "the second teacher is trained the same way"),
                        ("adv_teacher_lr", "the second teacher is trained the same way"),
                        ("adv_teacher_from", "the second teacher is trained the same way")):
        if getattr(rb, field) != getattr(default, field) and no_finetune:   # the defaults go unused, silently
            raise ConfigError(f"robustness.{field} is set but the teacher gets no adversarial finetune ({what})",
                              f"drop robustness.{field}, or --teacher-robust / --robust-teacher-epochs 0")
    if (rb.adv_teacher_from is None) != (rb.adv_teacher_from_checkpoint is None):
        given, missing = (("adv_teacher_from", "adv_teacher_from_checkpoint") if rb.adv_teacher_from is not None
                          else ("adv_teacher_from_checkpoint", "adv_teacher_from"))
        raise ConfigError(f"robustness.{given} is set without robustness.{missing} (the robust model to distil the "
                          "second teacher from, and its weights)",
                          "give both, e.g. robustness.adv_teacher_from = \"wide.py:factory\" and "
                          "robustness.adv_teacher_from_checkpoint = \"wide_robust.pt\", or neither")
    if rb.adv_teacher_from_checkpoint is not None and not Path(rb.adv_teacher_from_checkpoint).is_file():
        raise ConfigError(f"robustness.adv_teacher_from_checkpoint {rb.adv_teacher_from_checkpoint!r} is not a file",
                          "give the path of the robust model's state_dict (torch.save(model.state_dict(), path))")
    if rb.adv_teacher_from is not None and rb.kd_adv == 0 and rb.student_init == "robust":
        raise ConfigError("robustness.adv_teacher_from is set but nothing reads the second teacher (kd_adv = 0 and "
                          "the student starts from the first teacher)",
                          "drop robustness.adv_teacher_from, or give kd_adv > 0 or student_init = \"adversarial\"")
    for field in ("adv_teacher_beta", "adv_teacher_lr", "adv_teacher_from"):
        if getattr(rb, field) != getattr(default, field) and not rb.adv_teacher:
            raise ConfigError(f"robustness.{field} is set but robustness.adv_teacher = false (one teacher)",
                              f"drop robustness.{field}, or set robustness.adv_teacher = true")
    if isinstance(rb.student_init, str) and ":" in rb.student_init:   # layer-wise: first:prefix
        first, _, prefix = rb.student_init.partition(":")
        _one_of(first, ("adversarial", "robust"), "robustness.student_init =", "teacher of the student's early layers")
        if not prefix.strip():
            raise ConfigError(f"robustness.student_init {rb.student_init!r} names no layer to switch teachers at",
                              'give e.g. robustness.student_init = "adversarial:layers.2" (parameter-name prefix)')
    elif not isinstance(rb.student_init, float):
        _one_of(rb.student_init, ("adversarial", "robust"), "robustness.student_init =", "student's initial weights")
    elif not 0 < rb.student_init < 1:
        raise ConfigError(f"robustness.student_init {rb.student_init} is out of range (a weight average's weight of "
                          "the adversarial teacher)", "give a number between 0 and 1 (e.g. 0.5), or adversarial | "
                          "robust")
    if rb.student_jsd > 0 and not rb.augmix:
        raise ConfigError("robustness.student_jsd is set but robustness.augmix is off (the JSD term compares AugMix "
                          "views)", "drop robustness.student_jsd, or turn robustness.augmix back on")
    for bad, what, fix in (
            (cfg.search.method != "snl", f"--search {cfg.search.method}",
             "use --search snl (the robust objective trains the ReLU masks)"),
            (cfg.dp.epsilon is not None, "--dp-epsilon", "drop --dp-epsilon or --robust (DP-SGD and adversarial "
                                                          "training are not combined)"),
            (cfg.pruning.prune_channels is not None or cfg.pruning.mac_budget is not None or cfg.pruning.sparsity
             is not None, "channel pruning / sparsity", "drop --prune-channels / --mac-budget / --sparsity, or --robust"),
            (cfg.data.image_size < 32, f"--image-size {cfg.data.image_size}", "use --image-size 32 or more")):
        if bad:
            raise ConfigError(f"--robust with {what} is not supported", fix)


def check_robustness(cfg: CompileConfig) -> None:
    check_robust_compile(cfg)
    if cfg.robustness.split not in ("test", "val"):
        raise ConfigError(f"--robustness-split must be test or val, not {cfg.robustness.split!r}",
                          "use --robustness-split val to choose robust settings without looking at the test split")
    if cfg.robustness != RobustnessSection():  # every field set is checked, even with eval off
        robustness_settings(cfg)
    if cfg.robustness.eval or cfg.robustness.robust:  # the robust compile reports its robustness too
        if cfg.data.image_size < 32:
            raise ConfigError(f"--eval-robustness needs images of at least 32×32 pixels (the corruptions' minimum), "
                              f"not --image-size {cfg.data.image_size}", "use --image-size 32 or more")
        import importlib.util

        if importlib.util.find_spec("imagecorruptions") is None:
            raise ConfigError("--eval-robustness needs the imagecorruptions package",
                              "pip install 'relucomp[robust]' (imagecorruptions-imaug, the maintained fork)")


def _check_rgb(cfg: CompileConfig) -> None:
    """Refuse greyscale image folders for --eval-robustness (file headers only, nothing decoded)."""
    from .data.load import parse_data_spec
    from .robustness import check_rgb_files

    kind, path = parse_data_spec(cfg.data.spec)
    if kind in ("folder", "utkface") and path is not None and path.exists():
        check_rgb_files(path.parent if path.is_file() else path)


# --------------------------------------------------------------------------- TOML

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        out = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{out}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: CompileConfig, *, header: dict[str, Any] | None = None) -> str:
    """The config as TOML (``None`` fields omitted: they are the defaults)."""
    lines = ["# relucomp compile configuration; replay: relucomp compile --config THIS_FILE --out NEW_DIR", ""]
    if header:
        lines += ["[relucomp]"] + [f"{k} = {_toml_value(v)}" for k, v in header.items() if v is not None] + [""]
    for sec, values in cfg.model_dump().items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)

