"""Experiment sweeps: a grid of methods × seeds × learning rates × batch sizes × tasks at an equal
budget, run resumably (locally or as a slurm array), and the report that compares them."""

from .spec import Cell, Sweep, expand, load_sweep

__all__ = ["Cell", "Sweep", "expand", "load_sweep"]
