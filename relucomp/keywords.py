"""The library keywords of ``relucomp.compile`` (and the CLI's parameter names) and the config fields they set.

Kept free of imports so that the command line can group its ``--help`` by config section without importing
the config model (pydantic) or torch.
"""

from __future__ import annotations

#: the keyword arguments of ``relucomp.compile`` (and the CLI's parameter names) -> config fields
KEYWORDS: dict[str, str] = {
    "target": "data.target", "fair_groups": "data.fair_groups", "limit": "data.limit",
    "image_size": "data.image_size", "num_classes": "data.num_classes", "cache_dir": "data.cache_dir",
    "checkpoint": "model.checkpoint", "pretrained": "model.pretrained", "pretrain_epochs": "model.pretrain_epochs",
    "leaf_modules": "model.leaf_modules",
    "relu_budget": "search.relu_budget", "granularity": "search.granularity", "search": "search.method",
    "search_epochs": "search.epochs", "lr": "search.lr", "alpha_lr": "search.alpha_lr",
    "kd_weight": "search.kd_weight", "kd_temperature": "search.kd_temperature",
    "replace_maxpool": "search.replace_maxpool", "budget_includes_maxpool": "search.budget_includes_maxpool",
    "replacement": "search.replacement", "warmup": "search.warmup", "hysteresis": "search.hysteresis",
    "refine": "search.refine",
    "finetune_epochs": "finetune.epochs", "ft_kd_weight": "finetune.kd_weight", "ft_temperature": "finetune.temperature",
    "bn_recalibrate": "finetune.bn_recalibrate", "effort": "runtime.effort",
    "fair_method": "fairness.method", "tolerance": "fairness.tolerance", "fair_phase": "fairness.phase",
    "dual_lr": "fairness.dual_lr",
    "prune_channels": "pruning.prune_channels", "mac_budget": "pruning.mac_budget", "sparsity": "pruning.sparsity",
    "prune_importance": "pruning.importance",
    "export": "export.enabled", "gate_form": "export.gate_form", "export_target": "export.target",
    "export_weights": "export.weights",
    "dp_epsilon": "dp.epsilon", "dp_delta": "dp.delta", "dp_max_grad_norm": "dp.max_grad_norm",
    "dp_phase": "dp.phase", "dp_batch_size": "dp.batch_size", "dp_accountant": "dp.accountant",
    "dp_augmult": "dp.augmult",
    "seed": "runtime.seed", "batch_size": "runtime.batch_size", "device": "runtime.device",
    "out_dir": "runtime.out_dir", "resume": "runtime.resume", "progress": "runtime.progress",
    "diagnose": "runtime.diagnose", "nproc": "runtime.nproc", "amp": "runtime.amp", "workers": "runtime.workers",
    "pin_memory": "runtime.pin_memory", "cudnn_benchmark": "runtime.cudnn_benchmark",
    "eval_robustness": "robustness.eval", "robust": "robustness.robust", "corruptions": "robustness.corruptions",
    "severities": "robustness.severities", "robustness_samples": "robustness.samples",
    "robustness_split": "robustness.split",
    "pgd_epsilon": "robustness.pgd_epsilon", "pgd_step": "robustness.pgd_step", "pgd_steps": "robustness.pgd_steps",
    "teacher_robust": "robustness.teacher_robust", "robust_teacher_epochs": "robustness.teacher_epochs",
    "robust_teacher_lr": "robustness.teacher_lr",
    "train_attack": "robustness.train_attack", "train_attack_steps": "robustness.train_attack_steps",
    "train_epsilon": "robustness.train_epsilon", "trades_beta": "robustness.trades_beta",
    "helper_weight": "robustness.helper_weight", "adv_teacher": "robustness.adv_teacher",
    "adv_teacher_beta": "robustness.adv_teacher_beta", "adv_teacher_lr": "robustness.adv_teacher_lr",
    "student_init": "robustness.student_init",
    "augmix": "robustness.augmix", "augmix_ops": "robustness.augmix_ops",
    "student_augmix_ops": "robustness.student_augmix_ops", "jsd_weight": "robustness.jsd_weight",
    "kd_clean": "robustness.kd_clean",
    "kd_natural": "robustness.kd_natural", "kd_adv": "robustness.kd_adv",
    "student_jsd": "robustness.student_jsd", "dual_bn": "robustness.dual_bn",
    "export_branch": "robustness.export_branch", "compare_branches": "robustness.compare_branches",
    "natural_branch": "robustness.natural_branch", "clean_teacher": "robustness.clean_teacher",
    "search_objective": "robustness.search_objective",
}
