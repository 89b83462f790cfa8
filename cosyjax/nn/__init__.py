"""Layers shared by the stages."""

from cosyjax.nn.conv import Conv1d

__all__ = ["Conv1d"]
