"""evomerge: evolutionary optimization of model-merge recipes."""

__version__ = "0.1.0"
