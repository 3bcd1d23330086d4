"""Private-inference tooling: measured 2PC runs (SPU) and a fitted cost model.

* :mod:`relucomp.pi.bench` — ``relucomp pi-bench``: the driver (relucomp's env);
  builds the SPU venv, starts the two parties, collects the results.
* :mod:`relucomp.pi.onnx2jax` and :mod:`relucomp.pi.worker` — run inside the SPU
  venv (Python 3.11, numpy < 2, jax ≤ 0.4.34); they never import torch.
* :mod:`relucomp.pi.estimate` — ``relucomp estimate``: the cost model fitted to
  pi-bench runs on this machine (``cost_model.json``).

Nothing here imports torch at import time.
"""
