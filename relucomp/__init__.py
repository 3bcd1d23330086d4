"""relucomp: compile PyTorch models to a ReLU budget for private inference."""

__version__ = "0.1.0"
