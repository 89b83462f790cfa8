"""Reading a reference case directory (the contract in shared/golden/FORMAT.md)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np


class CaseError(ValueError):
    """A case directory does not follow the case format."""


@dataclasses.dataclass
class Case:
    """A reference case: a release-layout model dir plus golden arrays keyed ``<group>/<name>``."""

    path: str
    arrays: dict[str, np.ndarray]
    manifest: dict[str, Any]
    meta: dict[str, Any]

    @property
    def model_dir(self) -> str:
        return os.path.join(self.path, "model")

    @property
    def groups(self) -> list[str]:
        """Groups in the order their first key appears in golden.npz."""
        seen: list[str] = []
        for key in self.arrays:
            g = key.split("/", 1)[0]
            if g not in seen:
                seen.append(g)
        return seen

    def group(self, name: str) -> dict[str, np.ndarray]:
        """All arrays of one group, keyed by the name after ``<group>/``."""
        prefix = name + "/"
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}


def load_case(path: str) -> Case:
    """Load ``golden.npz``, ``manifest.json`` and ``meta.json`` of a case directory."""
    if not os.path.isdir(path):
        raise CaseError(f"{path}: case directory not found")
    for name in ("golden.npz", "manifest.json", "meta.json", "model"):
        if not os.path.exists(os.path.join(path, name)):
            raise CaseError(f"{path}: not a reference case (missing {name})")
    with np.load(os.path.join(path, "golden.npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    for key in arrays:
        if "/" not in key:
            raise CaseError(f"{path}/golden.npz: key {key!r} is not of the form <group>/<name>")
    return Case(path=os.path.abspath(path), arrays=arrays, manifest=manifest, meta=meta)
