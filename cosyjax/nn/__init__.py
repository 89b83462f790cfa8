"""Layers shared by the stages, all under a stage's ``cosyjax.precision.Precision``."""

from cosyjax.nn.conv import Conv1d
from cosyjax.nn.dense import Dense

__all__ = ["Conv1d", "Dense"]
