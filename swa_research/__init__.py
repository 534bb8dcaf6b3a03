"""swa_research: SGD vs Stochastic Weight Averaging, composed from Hydra config groups."""

__version__ = "0.3.0"
