"""Architecture registry, model specs and checkpoint loading.

A *model spec* is one of:

* a built-in architecture name, e.g. ``resnet18`` (case-insensitive; ``-`` and
  ``_`` are ignored, so ``ResNet-18`` and ``wrn-22-8`` work too);
* ``path/to/file.py:factory``: the file is imported by path and
  ``factory()`` is called;
* ``package.module:factory``: the module is imported from ``sys.path``.

A factory receives ``num_classes`` when its signature accepts it (by name or
through ``**kwargs``).  Every failure is reported as a
:class:`~relucomp.errors.ModelLoadError` with a cause and a fix, never as a raw
torch or import traceback.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from relucomp.errors import ModelLoadError
from relucomp.models import cifar

__all__ = [
    "ARCHITECTURES",
    "list_architectures",
    "build_model",
    "load_model",
    "load_checkpoint",
]

ModelFactory = Callable[..., nn.Module]

#: Built-in architectures: name -> ``factory(num_classes=10, **kwargs)``.
ARCHITECTURES: dict[str, ModelFactory] = {
    "resnet8": cifar.resnet8,
    "resnet18": cifar.resnet18,
    "resnet20": cifar.resnet20,
    "resnet56": cifar.resnet56,
    "wrn22_8": cifar.wrn22_8,
    "tinycnn": cifar.tinycnn,
}

_MAX_LISTED_KEYS = 5


def list_architectures() -> list[str]:
    """Return the built-in architecture names, sorted."""
    return sorted(ARCHITECTURES)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def _resolve_architecture(name: str) -> str:
    """Map a user-typed name to its registry key or raise a helpful error."""
    by_canonical = {_canonical(k): k for k in ARCHITECTURES}
    key = by_canonical.get(_canonical(name))
    if key is not None:
        return key
    known = list_architectures()
    close = difflib.get_close_matches(_canonical(name), list(by_canonical), n=1, cutoff=0.5)
    hint = f"did you mean {by_canonical[close[0]]!r}? " if close else ""
    raise ModelLoadError(
        f"unknown architecture {name!r}; known architectures: {', '.join(known)}",
        f"{hint}use one of the known names, or pass 'path/to/file.py:factory' "
        "or 'package.module:factory' for your own model",
    )


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a built-in architecture by (tolerantly matched) name.

    Raises:
        ModelLoadError: unknown name, or the factory rejected the arguments.
    """
    key = _resolve_architecture(name)
    try:
        return ARCHITECTURES[key](num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot build architecture {key!r}: {exc}",
            f"check the arguments passed to {key} (num_classes={num_classes}, "
            f"options={sorted(kwargs) or 'none'})",
        ) from exc


# --------------------------------------------------------------------------- specs


def _split_spec(spec: str) -> tuple[str, str] | None:
    """Split ``target:factory`` at the last colon; ``None`` if there is none."""
    if ":" not in spec:
        return None
    target, _, factory = spec.rpartition(":")
    if not target or not factory:
        raise ModelLoadError(
            f"malformed model spec {spec!r}",
            "use 'path/to/file.py:factory' or 'package.module:factory'",
        )
    return target, factory


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_file(path_str: str) -> ModuleType:
    path = Path(path_str).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise ModelLoadError(
            f"model file {str(path)!r} {what}",
            "check the path before ':' in the model spec (it is relative to "
            f"the current directory {str(Path.cwd())!r})",
        )
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    mod_name = f"_relucomp_user_model_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(
            f"cannot import {str(path)!r} as a Python module",
            "give a '.py' file that defines the model factory",
        )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    # Let the file import its sibling modules.
    parent = str(path.parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise ModelLoadError(
            f"importing model file {str(path)!r} raised {type(exc).__name__}: {exc}",
            "fix the error in that file (run `python <file>` to see the full traceback)",
        ) from exc
    finally:
        if added:
            try:
                sys.path.remove(parent)
            except ValueError:
                pass
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"module {name!r} not found ({exc})",
            "install the package or add its folder to PYTHONPATH; for a file use "
            "'path/to/file.py:factory'",
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"importing module {name!r} raised {type(exc).__name__}: {exc}",
            f"fix the error in that module (run `python -c 'import {name}'` to see it)",
        ) from exc


def _get_factory(module: ModuleType, attr: str, where: str) -> Callable[..., Any]:
    if not hasattr(module, attr):
        public = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        available = ", ".join(public[:10]) or "none"
        raise ModelLoadError(
            f"{where} has no attribute {attr!r} (callables there: {available})",
            f"{hint}name a function or nn.Module class defined in {where} after ':'",
        )
    factory = getattr(module, attr)
    if not callable(factory):
        raise ModelLoadError(
            f"{where}:{attr} is a {type(factory).__name__}, not a callable factory",
            f"make {attr} a function (or nn.Module class) that returns the model",
        )
    return factory


def _accepts_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == "num_classes" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in params
    )


def _call_factory(factory: Callable[..., Any], num_classes: int, label: str) -> nn.Module:
    kwargs = {"num_classes": num_classes} if _accepts_num_classes(factory) else {}
    call = f"{label}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"model factory {call} raised {type(exc).__name__}: {exc}",
            f"fix the factory so that {call} returns an nn.Module",
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"model factory {label} returned {type(model).__name__}, not a torch.nn.Module",
            "return the model instance (an nn.Module) from the factory",
        )
    return model


def _model_from_spec(spec: str, num_classes: int) -> nn.Module:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(
            f"empty or invalid model spec {spec!r}",
            f"give an architecture name ({', '.join(list_architectures())}) or "
            "'path/to/file.py:factory'",
        )
    spec = spec.strip()
    parts = _split_spec(spec)
    if parts is None:
        if _looks_like_path(spec):
            p = Path(spec)
            if p.is_dir():
                fix = (f"inspect {p / 'model.onnx'} (a compile output)" if (p / "model.onnx").is_file()
                       else "give a model file with its factory, e.g. 'model.py:make_model', or an ONNX file")
                raise ModelLoadError(f"model spec {spec!r} is a directory, not a model", fix)
            if p.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".safetensors"):
                raise ModelLoadError(
                    f"{spec!r} is a weights file, not a model definition",
                    "give the architecture with --checkpoint, e.g. 'resnet20 --checkpoint "
                    f"{spec}'; a compiled model is inspected as OUT/model.onnx",
                )
            if p.suffix.lower() != ".py":
                raise ModelLoadError(f"model spec {spec!r} is not a Python file, ONNX file or architecture name",
                                     f"give 'file.py:factory', a .onnx file or one of {', '.join(list_architectures())}")
            raise ModelLoadError(
                f"model spec {spec!r} names a file but no factory",
                f"append the factory name, e.g. '{spec}:make_model'",
            )
        return build_model(spec, num_classes=num_classes)
    target, attr = parts
    if _looks_like_path(target) or Path(target).is_file():
        module = _import_file(target)
    else:
        module = _import_module(target)
    factory = _get_factory(module, attr, repr(target))
    return _call_factory(factory, num_classes, f"{target}:{attr}")


# ----------------------------------------------------------------------- checkpoints


def _extract_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelLoadError(
            f"checkpoint {str(path)!r} does not hold a state_dict "
            f"(found {type(obj).__name__})",
            "save it with torch.save(model.state_dict(), path), or a dict with a "
            "'state_dict' or 'model' key holding one",
        )
    return obj


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" (+{more} more)" if more > 0 else "")


def load_checkpoint(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` in place (strict) and return it.

    Accepts a raw state_dict or a dict with a ``state_dict`` / ``model`` key.
    A ``module.`` prefix left by ``nn.DataParallel`` is stripped.

    Raises:
        ModelLoadError: missing or unreadable file, not a state_dict, or keys /
            shapes that do not match the model.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise ModelLoadError(
            f"checkpoint {str(path)!r} {what}",
            "check the --checkpoint path, or leave it out to use random weights",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip / torch errors: all mean "unreadable"
        reason = type(exc).__name__  # torch's own text suggests weights_only=False: never quote that advice
        raise ModelLoadError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({reason})",
            "re-save it with torch.save(model.state_dict(), path); pickled whole "
            "models and custom objects are refused (weights_only=True)",
        ) from exc
    state = dict(_extract_state_dict(obj, path))

    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(
        k.startswith("module.") for k in expected
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"{len(missing)} missing: {_fmt_keys(missing)}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected: {_fmt_keys(unexpected)}")
        raise ModelLoadError(
            f"checkpoint {str(path)!r} does not match the model's keys ({'; '.join(details)})",
            "load it into the architecture it was saved from (same model spec)",
        )
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} has tensors of the wrong shape ({len(mismatched)}: "
            f"{_fmt_keys(mismatched)})",
            "use the same architecture, width and --num-classes the checkpoint was "
            "trained with",
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(
            f"loading checkpoint {str(path)!r} failed: {type(exc).__name__}: {exc}",
            "load it into the architecture it was saved from (same model spec)",
        ) from exc
    return model


def load_model(
    spec: str,
    *,
    num_classes: int = 10,
    checkpoint: str | Path | None = None,
) -> nn.Module:
    """Build the model named by ``spec`` and optionally load a checkpoint.

    Args:
        spec: built-in name (see :func:`list_architectures`),
            ``path/to/file.py:factory`` or ``package.module:factory``.
        num_classes: passed to the factory when it accepts it.
        checkpoint: optional state_dict file, loaded with ``strict=True``.

    Raises:
        ModelLoadError: for every user-caused failure, with cause and fix.
    """
    model = _model_from_spec(spec, num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
