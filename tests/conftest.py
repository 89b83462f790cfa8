"""Shared fixtures: the committed reference cases and the full-size release manifest."""

from __future__ import annotations

import glob
import json
import os

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def case_dirs() -> list[str]:
    """Every committed reference case (tests/data/*/golden.npz)."""
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(DATA, "*", "golden.npz")))


def cases_with_group(group: str) -> list[str]:
    """Committed cases that hold ``group`` (a key starting with ``group/``)."""
    import numpy as np

    out = []
    for d in case_dirs():
        with np.load(os.path.join(d, "golden.npz")) as z:
            if any(k.startswith(group + "/") for k in z.files):
                out.append(d)
    return out


@pytest.fixture(scope="session")
def full_size_manifest() -> dict:
    with open(os.path.join(DATA, "full-size-manifest.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def full_size_model_dir(tmp_path_factory, full_size_manifest) -> str:
    """A weightless release directory at the real sizes: yaml model section + Qwen config.json."""
    import yaml

    d = tmp_path_factory.mktemp("full_size_release")
    section = full_size_manifest["config"]["yaml_model_section"]
    with open(d / "cosyvoice3.yaml", "w", encoding="utf-8") as f:
        f.write(_to_hyperpyyaml(section))
    (d / "CosyVoice-BlankEN").mkdir()
    with open(d / "CosyVoice-BlankEN" / "config.json", "w", encoding="utf-8") as f:
        json.dump(full_size_manifest["config"]["qwen_config_json"], f)
    del yaml
    return str(d)


def _to_hyperpyyaml(node, indent: int = 0) -> str:
    """Render the manifest's JSON form of the yaml (``__tag__`` keys, "!ref ..." strings) back to yaml."""
    pad = " " * indent
    lines = []
    for key, value in node.items():
        if key == "__tag__":
            continue
        if isinstance(value, dict):
            tag = value.get("__tag__", "")
            lines.append(f"{pad}{key}: {tag}".rstrip())
            lines.append(_to_hyperpyyaml(value, indent + 4))
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def _scalar(value) -> str:
    if isinstance(value, str) and value.startswith("!ref"):
        return value
    return json.dumps(value)
