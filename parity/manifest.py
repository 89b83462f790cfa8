"""The full-size release manifest (tests/data/full-size-manifest.json): the real config, no weights.

``write_weightless_release(manifest, out_dir)`` writes a release directory holding only the yaml model
section and the Qwen ``config.json`` at the real sizes, so ``load_model_config`` gives the release
configs for shape checks (``jax.eval_shape``) and benchmarks with random weights.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from cosyjax.config import QWEN_DIR, YAML_NAME, ModelConfig, load_model_config

MANIFEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                        "full-size-manifest.json")


def load_manifest(path: str = MANIFEST) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def to_hyperpyyaml(node: Mapping[str, Any], indent: int = 0) -> str:
    """Render the manifest's JSON form of the yaml (``__tag__`` keys, "!ref ..." strings) back to yaml."""
    pad = " " * indent
    lines = []
    for key, value in node.items():
        if key == "__tag__":
            continue
        if isinstance(value, dict):
            lines.append(f"{pad}{key}: {value.get('__tag__', '')}".rstrip())
            lines.append(to_hyperpyyaml(value, indent + 4))
        elif isinstance(value, str) and value.startswith("!ref"):
            lines.append(f"{pad}{key}: {value}")
        else:
            lines.append(f"{pad}{key}: {json.dumps(value)}")
    return "\n".join(line for line in lines if line)


def write_weightless_release(manifest: Mapping[str, Any], out_dir: str) -> str:
    """Write ``cosyvoice3.yaml`` + ``CosyVoice-BlankEN/config.json`` of the manifest into ``out_dir``."""
    os.makedirs(os.path.join(out_dir, QWEN_DIR), exist_ok=True)
    with open(os.path.join(out_dir, YAML_NAME), "w", encoding="utf-8") as f:
        f.write(to_hyperpyyaml(manifest["config"]["yaml_model_section"]))
    with open(os.path.join(out_dir, QWEN_DIR, "config.json"), "w", encoding="utf-8") as f:
        json.dump(manifest["config"]["qwen_config_json"], f)
    return out_dir


def release_config(manifest_path: str = MANIFEST) -> ModelConfig:
    """The release's ModelConfig, read through the same yaml path a real release takes."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return load_model_config(write_weightless_release(load_manifest(manifest_path), d))
