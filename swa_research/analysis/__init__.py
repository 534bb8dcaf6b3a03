"""Analyses of finished runs (``python -m swa_research.analysis.<name> RUN_DIR``)."""
