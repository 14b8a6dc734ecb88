"""tlexp: transfer-learning experiments for image classification."""

__version__ = "0.1.0"
