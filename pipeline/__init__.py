"""Nucleus pipeline: the CLI, config models, run directory and one module per stage."""

__version__ = "0.1.0"
