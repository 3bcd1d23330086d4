"""relucomp: compile PyTorch models to a ReLU budget for private inference.

>>> import relucomp
>>> res = relucomp.compile("resnet8", "synthetic", relu_budget="2k", out_dir="out")  # doctest: +SKIP
"""

__version__ = "0.1.0"

__all__ = ["__version__", "compile", "inspect", "load_compiled", "evaluate_compiled", "CompileResult", "RelucompError"]


def __getattr__(name):  # lazy: `import relucomp` stays cheap, `relucomp.compile` pulls torch in
    if name in ("compile", "inspect", "load_compiled", "CompileResult"):
        from . import api

        return getattr(api, name)
    if name == "evaluate_compiled":
        from .reevaluate import evaluate_compiled

        return evaluate_compiled
    if name == "RelucompError":
        from .errors import RelucompError

        return RelucompError
    raise AttributeError(f"module 'relucomp' has no attribute {name!r}")
