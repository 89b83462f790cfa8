"""Per-stage parity runners.

Each stage module ``cosyjax.parity.stages.<stage>`` defines ``RUNNERS``: a dict from a case group
name (``hift``, ``hift_partial``, ...) to ``run(case, group, model) -> GroupResult``.  A group of a
case with no runner is reported as ``not-implemented`` (a failure), never as passed.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.parity.case import Case
from cosyjax.parity.compare import Comparison

STAGES = ("llm", "flow", "hift", "tts", "train", "frontend")


@dataclasses.dataclass
class GroupResult:
    """What one group's run produced.

    Attributes:
      outputs: our arrays under the same ``<group>/<name>`` keys as the reference's.
      comparisons: one per compared key, with the tolerance used.
      plots: (title, key) pairs worth plotting as overlays (ours vs reference).
      notes: measurements reported with the group that are not pass/fail criteria.
    """

    outputs: dict[str, np.ndarray]
    comparisons: list[Comparison]
    plots: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


Runner = Callable[[Case, str, ConvertedModel], GroupResult]


def stage_of(group: str) -> str:
    """``flow_stream_partial`` -> ``flow``."""
    return group.split("_", 1)[0]


def _stage_modules():
    for stage in STAGES:
        name = f"{__name__}.{stage}"
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def runners() -> dict[str, Runner]:
    """Group name -> runner, gathered from the stage modules that exist."""
    out: dict[str, Runner] = {}
    for module in _stage_modules():
        out.update(module.RUNNERS)
    return out


def release_free_groups() -> set[str]:
    """Groups whose runner reads nothing of the converted torch release (a stage module with
    ``USES_RELEASE = False``): ``check`` converts the case's release only when a selected group needs it,
    and hands these runners ``model=None``."""
    return {g for module in _stage_modules() if not getattr(module, "USES_RELEASE", True) for g in module.RUNNERS}
